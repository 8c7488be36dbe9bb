"""One head training step with the edge runtime, run the same way on the host and on the emulated device.

    python head_step.py BUNDLE INPUTS.npz OUT.npz

INPUTS holds ``input_ids``, ``attention_mask`` and ``grad_z``. The script opens the bundle with the
ort backend (one thread), runs forward, backward and one SGD step (momentum 0.9, lr 0.01) and a
second forward with the updated θ, and writes ``z``, ``z_after``, ``grad/<name>``, ``param/<name>``
the onnxruntime version (as ``ort_version``, a uint8 array of its ASCII) and whether torch got
imported (``torch_loaded``) into OUT. Standard library, numpy and flexsfl's torch-free runtime only.
"""

from __future__ import annotations

import sys

import numpy as np

__all__ = ["main"]


def main(bundle_path: str, inputs: str, out: str) -> None:
    import onnxruntime

    from flexsfl.core.bundle import load_bundle
    from flexsfl.edge_runtime.backends import open_backend
    from flexsfl.edge_runtime.optim import make_optimizer

    batch = np.load(inputs)
    backend = open_backend("ort", load_bundle(bundle_path), threads=1)
    z = backend.forward(batch["input_ids"], batch["attention_mask"])
    grads = backend.backward(batch["grad_z"])
    params = backend.get_params()
    make_optimizer("sgd", lr=0.01, momentum=0.9).step(params, grads)
    backend.set_params(params)
    z_after = backend.forward(batch["input_ids"], batch["attention_mask"], keep=False)
    result = {"z": z, "z_after": z_after, "ort_version": np.frombuffer(onnxruntime.__version__.encode(), np.uint8)}
    result |= {f"grad/{n}": g for n, g in grads.items()}
    result |= {f"param/{n}": p for n, p in backend.get_params().items()}
    result["torch_loaded"] = np.array("torch" in sys.modules)  # x86's onnxruntime-training imports it; aarch64 must not
    np.savez(out, **result)


if __name__ == "__main__":
    main(*sys.argv[1:])
