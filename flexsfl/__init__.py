"""flexsfl: flexible personalized split federated learning for on-device fine-tuning."""

from edge_runtime import __version__

__all__ = ["__version__"]
