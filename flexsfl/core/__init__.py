"""The torch-free core every role stands on: errors, the wire codec, the bundle format, device
profiles and targets, the cost model and split planner, atomic writes.

Split selection is four modules: :mod:`.model_config` reads a model's shape, :mod:`.cost` counts
its FLOPs and saved activations, :mod:`.memory` predicts device memory per runtime, and
:mod:`.planner` adds the network and the server and chooses (:mod:`.profiles` holds example
devices). :mod:`.constants` names the optimizers and tasks every layer agrees on.

It imports nothing else of flexsfl's and no heavy runtime, so it installs and imports on a device.
"""
