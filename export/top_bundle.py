"""The device's top in a bundle (``flexsfl export --split S --top U``): lowering, adapter, manifest entries.

    cut the top -> train/eval programs -> lower per backend -> the top's PEFT adapter -> manifest

Where the top goes, so every weight is stored once:

- ONNX: ``ort/top_train.onnx`` and ``ort/top_eval.onnx`` beside the head's programs; all four
  share ``ort/weights.bin`` (:func:`~flexsfl.export.lower_onnx.share_weights` re-packs it), so a
  causal LM's output matrix tied to its embedding is one tensor in it;
- ExecuTorch: methods ``top_train`` and ``top_eval`` of the head's ``.pte``
  (:func:`~flexsfl.export.lower_executorch.lower_executorch` with ``top=``);
- the top's personal tensors (its blocks' LoRA and the task head) in PEFT format in
  ``top_adapter/``, keyed by canonical name.

Manifest: programs ``<backend>.top_train`` / ``<backend>.top_eval`` with every input and output
(parameters by canonical name), artifacts ``ort.top_train``, ``ort.top_eval`` and
``top.adapter``, and ``extra["top"]`` (:func:`top_manifest_extra`): the number of top blocks,
the first of them, and the top's trainable tensors.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import pathlib
from typing import TYPE_CHECKING

import numpy as np
import torch

from flexsfl.core.bundle import ADAPTER_WEIGHTS_NAME, ParamSpec, TensorSpec
from flexsfl.core.errors import ExportError
from flexsfl.export.programs import with_canonical_names
from flexsfl.export.top_programs import EVAL, TRAIN, TopPrograms, build_top_programs, export_top_programs

if TYPE_CHECKING:
    from flexsfl.model.loading import LoadedModel
    from flexsfl.model.partition import Top

__all__ = ["TopExport", "build_top_export", "lower_top_onnx", "verify_top_executorch", "write_top_adapter",
           "top_manifest_extra", "TOP_ADAPTER_DIR", "TOP_ADAPTER_ROLE", "ONNX_NAMES"]

log = logging.getLogger("flexsfl.export.top")

TOP_ADAPTER_DIR = "top_adapter"
TOP_ADAPTER_ROLE = "top.adapter"  # artifacts role of the top's adapter_model.safetensors
ONNX_NAMES = {TRAIN: "top_train.onnx", EVAL: "top_eval.onnx"}

Specs = tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]


@dataclasses.dataclass(frozen=True)
class TopExport:
    """A cut top with its programs; ``canonical`` maps its own parameter names to canonical ones."""

    top: "Top"
    programs: TopPrograms
    canonical: dict[str, str]

    def specs(self, backend: str) -> dict[str, Specs]:
        """Manifest program entries ``{"<backend>.top_train": (inputs, outputs), ...}``."""
        p = self.programs
        return {f"{backend}.{TRAIN}": (p.train_spec.inputs, p.train_spec.outputs),
                f"{backend}.{EVAL}": (p.eval_spec.inputs, p.eval_spec.outputs)}


def build_top_export(loaded: "LoadedModel", top_blocks: int, *, split: int, max_batch: int, max_seq: int) -> TopExport:
    """Cut the last ``top_blocks`` blocks + final norm + task head and build their programs; the
    server's middle between ``split`` and them must keep at least one block (else ConfigError).

    The programs' specs name the trainable tensors by canonical (PEFT) name and their gradients
    ``grad.<name>`` (only names change), so the lowered graphs' inputs carry those names.
    """
    from flexsfl.model.partition import build_middle, build_top

    build_middle(loaded, split, top_blocks)  # checks the (split, top) layout, one line
    top = build_top(loaded, top_blocks)
    names = [n for n, _ in top.trainable()]
    programs = build_top_programs(top, names, max_batch=max_batch, max_seq=max_seq)
    canonical = top.canonical()

    programs = dataclasses.replace(
        programs, **{k: with_canonical_names(getattr(programs, k), canonical, what=k[:-5]) for k in ("train_spec", "eval_spec")})
    return TopExport(top=top, programs=programs, canonical=canonical)


def lower_top_onnx(top: TopExport, head_paths: list[pathlib.Path], weights: pathlib.Path, *, verify: bool = True
                   ) -> dict[str, pathlib.Path]:
    """Write ``top_train.onnx`` / ``top_eval.onnx`` beside the head's ONNX programs (``head_paths``)
    and re-pack ``weights`` so all of them share it; returns ``{"ort.top_train": path, ...}``."""
    from flexsfl.export.lower_onnx import share_weights, write_onnx_program

    out = weights.parent
    eps = export_top_programs(top.programs)
    spec = {TRAIN: top.programs.train_spec, EVAL: top.programs.eval_spec}
    paths = {role: write_onnx_program(ep, spec[role], out / ONNX_NAMES[role], role) for role, ep in eps.items()}
    share_weights([*head_paths, *paths.values()], weights)
    log.info("top ONNX programs: %s; shared %s now %.1f MB", ", ".join(f"{p.name} {p.stat().st_size / 1e6:.2f} MB"
             for p in paths.values()), weights.name, weights.stat().st_size / 1e6)
    if verify:
        verify_top_onnx(top.programs, paths[TRAIN], paths[EVAL])
    return {f"ort.{role}": p for role, p in paths.items()}


def verify_top_onnx(programs: TopPrograms, train: pathlib.Path, evaluate: pathlib.Path, tol: float = 1e-4) -> None:
    """Both ONNX programs against the torch programs on a padded example batch (rel err <= tol)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    b, t = min(3, programs.max_batch), min(11, programs.max_seq)
    for path, gm, args, names in (
        (train, programs.train, programs.example_train_args(b, t, seed=7), programs.train_spec.outputs),
        (evaluate, programs.eval, programs.example_eval_args(b, t, seed=7), programs.eval_spec.outputs),
    ):
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        got = sess.run(None, dict(zip([i.name for i in sess.get_inputs()], [a.numpy() for a in args])))
        with torch.no_grad():
            want = gm(*args)
        for spec, g, w in zip(names, got, want):
            w = w.numpy()
            err = float(np.linalg.norm(g - w) / max(float(np.linalg.norm(w)), 1e-12))
            if not err <= tol:
                raise ExportError(f"ONNX {path.name} output {spec.name} differs from the torch program "
                                  f"(rel err {err:.2e} > {tol:g}); please report this")


def verify_top_executorch(programs: TopPrograms, pte: pathlib.Path, tol: float = 1e-4) -> None:
    """The ``.pte``'s top methods against the torch programs at a batch/seq other than the traced
    one (rel err <= tol): ExecuTorch plans some graphs static-shaped, and a bundle whose top runs
    at one shape only must not be written."""
    from executorch.runtime import Runtime

    b, t = min(3, programs.max_batch), min(11, programs.max_seq)
    program = Runtime.get().load_program(pte)
    for method, gm, args in ((TRAIN, programs.train, programs.example_train_args(b, t, seed=7)),
                             (EVAL, programs.eval, programs.example_eval_args(b, t, seed=7))):
        try:
            got = program.load_method(method).execute(list(args))
        except Exception as e:  # noqa: BLE001 - the bindings raise RuntimeError/ValueError
            raise ExportError(f"the top's ExecuTorch {method} method fails at batch {b} x seq {t} ({str(e)[:120]}): "
                              "this model's top came out static-shaped; export the top with --backend ort") from None
        with torch.no_grad():
            want = gm(*args)
        for g, w in zip(got, want):
            err = float((g - w).norm() / w.norm().clamp_min(1e-12))
            if not err <= tol:
                raise ExportError(f"the top's ExecuTorch {method} differs from the torch program (rel err {err:.2e}); "
                                  "please report this")


def write_top_adapter(loaded: "LoadedModel", top: TopExport, root: pathlib.Path) -> tuple[str, tuple[ParamSpec, ...]]:
    """The top's tensors in PEFT format under ``root/top_adapter``; returns the weights file's
    relative path and the tensors' specs (program order).

    The config is the model's LoRA config restricted to the top's blocks, with the task head as
    a module to save, so ``PeftModel.from_pretrained`` loads the top's personal tensors.
    """
    import safetensors.torch

    from flexsfl.model.partition import block_of

    out = root / TOP_ADAPTER_DIR
    cfg = copy.deepcopy(loaded.model.peft_config["default"])
    cfg.layers_to_transform = list(top.top.block_ids) or None
    cfg.save_pretrained(str(out))
    named = dict(top.top.named_parameters())
    tensors = {top.canonical[n]: named[n].detach().contiguous() for n in top.programs.param_names}
    safetensors.torch.save_file(tensors, str(out / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    L = loaded.info.num_blocks
    specs = tuple(ParamSpec(name=n, shape=tuple(t.shape), dtype="float32", block=block_of(n, L)) for n, t in tensors.items())
    return f"{TOP_ADAPTER_DIR}/{ADAPTER_WEIGHTS_NAME}", specs


def top_manifest_extra(top: TopExport, params: tuple[ParamSpec, ...]) -> dict:
    """``extra["top"]``: what a device and the server need to know about the top."""
    return {
        "blocks": len(top.top.block_ids),
        "first_block": top.top.block_ids.start,
        "trainable_parameters": [p.to_json() for p in params],
        "step": "one fused train program per step: (h, mask, labels, θ_top) -> (loss, logits, dL/dh, grads)",
    }
