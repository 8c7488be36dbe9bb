"""flexsfl edge runtime: the torch-free client that trains a head on the device.

It imports only :mod:`flexsfl.core` and no torch; the ExecuTorch backend imports its runtime
lazily when selected.
"""
