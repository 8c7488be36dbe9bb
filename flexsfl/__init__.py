"""flexsfl: flexible personalized split federated learning for on-device fine-tuning."""

from importlib import metadata

try:
    __version__ = metadata.version("flexsfl")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
