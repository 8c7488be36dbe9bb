"""``flexsfl export``: a Hugging Face model -> an on-device training bundle, as a chain of named steps.

    check target -> load model + LoRA -> cut head -> forward/backward programs -> lower per
    backend -> tokenizer + PEFT adapter -> manifest -> verify (-> tar)

Every step is one call; the bundle is staged in a temporary directory next to ``--out`` and
renamed into place only when it is complete and verified, so a failed export never leaves a
half-written bundle behind.

One name everywhere: the programs are renamed to the canonical (PEFT) parameter names before
they are lowered, so a trainable tensor has the same name in the adapter file, in the
manifest's ``trainable_parameters``, as an ONNX graph input (its gradient output is
``grad.<name>``) and in the manifest's program specs, which describe each program exactly as
its runtime sees it (ExecuTorch methods by position, in the same order).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import shutil
import tempfile
import time
from typing import Iterator

from flexsfl.core.bundle import Bundle, TensorSpec, load_bundle
from flexsfl.core.errors import ConfigError
from flexsfl.core.targets import TargetProfile, get_target

from flexsfl.export.bundle_writer import tar_bundle, write_adapter, write_manifest, write_tokenizer
from flexsfl.export.config import BACKENDS, ExportConfig

# ExportConfig and BACKENDS live in flexsfl.export.config (torch-free, for the CLI); re-exported here so a
# caller builds the config and the bundle with one import.
__all__ = ["ExportConfig", "export_bundle", "target_notes", "BACKENDS"]

log = logging.getLogger("flexsfl.export")

# What one client step costs with each backend's programs (recorded in every manifest).
STEP_COST = {
    "split": "one forward (returns Z and the saved activations) + one backward (takes them with G) per step",
}


def target_notes(target: TargetProfile, backends: tuple[str, ...]) -> list[str]:
    """What the device needs for these backends, said before anything is built."""
    notes = []
    if "ort" in backends and not target.ort_training_wheel:
        notes.append(
            f"{target.name} is {target.arch}: PyPI has no onnxruntime-training wheel for it. The bundle's "
            "forward/backward programs run on the plain `onnxruntime` wheel (flexsfl flash installs it); ORT's own "
            "training artifacts (ort/training) need ONNX Runtime built from source with --enable_training."
        )
    if "executorch" in backends:
        notes.append("the executorch backend builds a small C shim over ExecuTorch's runtime with g++ once per device "
                     "(no torch); without a compiler it falls back to ExecuTorch's Python bindings, which need torch")
    return notes


class _Steps:
    """Named steps with timings, shown as they run."""

    def __init__(self, total: int, show: bool) -> None:
        self.total, self.show, self.n = total, show, 0
        self.seconds: dict[str, float] = {}
        self._console = None
        if show:
            from rich.console import Console

            self._console = Console(stderr=True)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.n += 1
        t0 = time.perf_counter()
        label = f"[{self.n}/{self.total}] {name}"
        if self._console is not None:
            with self._console.status(label + " ..."):
                yield
        else:
            yield
        dt = time.perf_counter() - t0
        self.seconds[name] = round(dt, 3)
        if self._console is not None:
            self._console.print(f"{label}  [dim]{dt:.1f} s[/dim]")
        log.info("%s: %.2f s", name, dt)


def export_bundle(cfg: ExportConfig, *, progress: bool = True) -> tuple[Bundle, pathlib.Path]:
    """Build, verify and place the bundle. Returns it and where it was written (dir or tarball)."""
    from flexsfl.model.loading import LoraSettings, load_model
    from flexsfl.model.partition import build_head
    from flexsfl.export.programs import build_head_programs, with_canonical_names
    from flexsfl.core.model_config import config_subset

    target = get_target(cfg.target)
    for note in target_notes(target, cfg.backends):
        log.warning(note)
    out = pathlib.Path(cfg.out)
    if out.exists() and not cfg.force and any(out.iterdir()):
        raise ConfigError(f"{out} already exists and is not empty; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    steps = _Steps(5 + len(cfg.backends) + int("ort" in cfg.backends and cfg.ort_training_artifacts)
                   + int(cfg.top is not None) * (1 + int("ort" in cfg.backends)), progress)
    try:
        with steps.step(f"load {cfg.model} with LoRA r={cfg.lora_r}"):
            lora = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=cfg.lora_targets)
            loaded = load_model(cfg.model, task=cfg.task, num_labels=cfg.num_labels, lora=lora, seed=cfg.seed)
        with steps.step(f"cut the head at split {cfg.split}"):
            head = build_head(loaded, cfg.split)
            names = [n for n, _ in head.trainable()]
        top = None  # U-shaped topology (--top): the device's top programs, lowered beside the head's
        if cfg.top is not None:
            from flexsfl.export import top_bundle

            with steps.step(f"build the top's programs (last {cfg.top} blocks + final norm + task head)"):
                top = top_bundle.build_top_export(loaded, cfg.top, split=cfg.split, max_batch=cfg.max_batch,
                                                  max_seq=cfg.max_seq)
        with steps.step("build forward/backward programs"):
            programs = build_head_programs(head, names, max_batch=cfg.max_batch, max_seq=cfg.max_seq)
            canonical = head.canonical()
            # the names the lowered graphs get
            programs = dataclasses.replace(
                programs, forward_spec=with_canonical_names(programs.forward_spec, canonical, what="forward"),
                backward_spec=with_canonical_names(programs.backward_spec, canonical, what="backward"))
        specs: dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]] = {}
        artifacts: dict[str, str] = {}
        runtime: dict[str, dict] = {}  # backend -> what its programs need from the device's runtime
        if "executorch" in cfg.backends:
            from flexsfl.export.lower_executorch import lower_executorch

            with steps.step("lower to ExecuTorch (.pte)"):
                pte = lower_executorch(programs, stage / "executorch", top=top and top.programs)
                if top is not None:
                    top_bundle.verify_top_executorch(top.programs, pte)
            artifacts["executorch.program"] = pte.relative_to(stage).as_posix()
            # its memory is planned for the largest batch: by default the one the device trains with
            runtime["executorch"] = {"planned_batch": cfg.max_batch, "planned_seq": cfg.max_seq,
                                     "train_batch": cfg.batch_size}
            specs["executorch.forward"] = (programs.forward_spec.inputs, programs.forward_spec.outputs)
            specs["executorch.backward"] = (programs.backward_spec.inputs, programs.backward_spec.outputs)
            specs.update(top.specs("executorch") if top else {})
        if "ort" in cfg.backends:
            from flexsfl.export.lower_onnx import WEIGHTS_INDEX_NAME, lower_onnx, runtime_requirements

            with steps.step("lower to ONNX (forward.onnx, backward.onnx)"):
                fwd, bwd, weights = lower_onnx(programs, stage / "ort", fused_ops=cfg.fused_ops)
            artifacts["ort.forward"] = fwd.relative_to(stage).as_posix()
            artifacts["ort.backward"] = bwd.relative_to(stage).as_posix()
            artifacts["ort.weights"] = weights.relative_to(stage).as_posix()
            artifacts["ort.weights_index"] = (weights.parent / WEIGHTS_INDEX_NAME).relative_to(stage).as_posix()
            onnx_files = [fwd, bwd]
            if top is not None:
                with steps.step("lower the top to ONNX (top_train.onnx, top_eval.onnx; one weights.bin)"):
                    top_paths = top_bundle.lower_top_onnx(top, [fwd, bwd], weights)
                artifacts.update({role: p.relative_to(stage).as_posix() for role, p in top_paths.items()})
                specs.update(top.specs("ort"))
                onnx_files += list(top_paths.values())
            runtime["ort"] = {**runtime_requirements(onnx_files), "fused_ops": cfg.fused_ops}
            specs["ort.forward"] = (programs.forward_spec.inputs, programs.forward_spec.outputs)
            specs["ort.backward"] = (programs.backward_spec.inputs, programs.backward_spec.outputs)
            if cfg.ort_training_artifacts:
                from flexsfl.export.ort_training import build_ort_training_artifacts

                with steps.step("build ONNX Runtime training artifacts"):
                    ort = build_ort_training_artifacts(
                        head, names, stage / "ort" / "training", max_batch=cfg.max_batch, max_seq=cfg.max_seq,
                        optimizer=cfg.optimizer, label=f"{loaded.info.id} split {cfg.split}",
                    )
                for role, path in ort.files.items():
                    artifacts[f"{role}_model" if role != "ort.checkpoint" else role] = path.relative_to(stage).as_posix()
                specs["ort.training"] = (ort.inputs, ort.outputs)
        with steps.step("write tokenizer and PEFT adapter"):
            tokenizer = write_tokenizer(loaded, stage, cfg.max_seq)
            adapter, params = write_adapter(loaded, head, stage)
            if top is not None:
                top_adapter, top_params = top_bundle.write_top_adapter(loaded, top, stage)
                artifacts[top_bundle.TOP_ADAPTER_ROLE] = top_adapter
        order = [canonical[n] for n in names]
        by_name = {p.name: p for p in params}
        params = tuple(by_name[n] for n in order)  # program input order
        with steps.step("write manifest and verify"):
            write_manifest(
                stage, loaded=loaded, split=cfg.split, backends=cfg.backends, target=target,
                optimizer={"name": cfg.optimizer, "lr": cfg.lr}, max_batch=cfg.max_batch, max_seq=cfg.max_seq,
                programs=specs, params=params, artifacts=artifacts, step={b: "split" for b in cfg.backends},
                tokenizer=tokenizer, adapter=adapter, runtime=runtime,
                extra={
                    "seed": cfg.seed,
                    # the model's shape, so a device can plan splits without the model installed
                    "model_config": config_subset(loaded.base.config.to_dict()),
                    "step_cost": STEP_COST["split"],
                    "optimizers": "sgd and adamw run on the device in numpy for the split programs (ExecuTorch's own "
                                  "Python training API offers SGD only)",
                    "export_seconds": steps.seconds,
                    "target_notes": target_notes(target, cfg.backends),
                    "saved_activations": programs.num_saved,
                    **({"top": top_bundle.top_manifest_extra(top, top_params)} if top is not None else {}),
                },
            )
            load_bundle(stage)
        if out.exists():
            shutil.rmtree(out)
        # A directory rename: the bundle appears whole (its manifest last, written atomically inside
        # the stage), so this stays os.replace rather than core.atomic, which writes single files.
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    bundle = load_bundle(out)
    where = out
    if cfg.tar:
        where = tar_bundle(out, out.with_name(out.name + ".tar.gz"))
    return bundle, where

