"""The torch-free core every role stands on: errors, the wire codec, the bundle format, device
profiles and targets, the cost model and split planner, atomic writes.

It imports nothing else of flexsfl's and no heavy runtime, so it installs and imports on a device.
"""
