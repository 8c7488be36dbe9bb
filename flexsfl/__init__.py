"""flexsfl."""
