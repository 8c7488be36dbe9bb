"""server_backend."""
