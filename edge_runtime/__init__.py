"""flexsfl edge runtime: the torch-free client that trains a head on the device.

Nothing in this package imports torch at module level; the ExecuTorch and eager-torch backends
import it lazily when selected.
"""

__version__ = "0.1.0"
