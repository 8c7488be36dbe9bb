"""Write a bundle: stage the files, hash every one, write the manifest last, optionally tar it.

The manifest is written after every other file and atomically (:mod:`flexsfl.core.atomic`),
so a bundle directory either has a manifest that covers all of its files or none at all. The
other files are written into the pipeline's staging directory, which is renamed into place
whole; the tarball, written beside its final name, is atomic on its own.
"""

from __future__ import annotations

import datetime
import pathlib
import tarfile
from typing import TYPE_CHECKING

from flexsfl import __version__
from flexsfl.core.atomic import atomic_path, atomic_write_text
from flexsfl.core.bundle import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Manifest,
    ParamSpec,
    TensorSpec,
    sha256_file,
)
from flexsfl.core.targets import TargetProfile

if TYPE_CHECKING:
    from flexsfl.model.loading import LoadedModel
    from flexsfl.model.partition import Head

__all__ = ["TOKENIZER_PATH", "ADAPTER_DIR", "write_tokenizer", "write_adapter", "write_manifest", "tar_bundle"]

TOKENIZER_PATH = "tokenizer/tokenizer.json"
ADAPTER_DIR = "adapter"


def write_tokenizer(loaded: "LoadedModel", root: pathlib.Path, max_seq: int) -> str:
    """Save the fast tokenizer as one ``tokenizer.json`` with truncation and padding configured.

    The edge reads it with the ``tokenizers`` library alone (no transformers, no torch).
    """
    from flexsfl.core.errors import ExportError

    tok = loaded.tokenizer
    if tok is None or not getattr(tok, "is_fast", False):
        raise ExportError(
            f"{loaded.source.path}: no fast tokenizer (tokenizer.json) to put in the bundle; add one to the model directory"
        )
    backend = tok.backend_tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else loaded.model.config.pad_token_id
    pad_token = tok.pad_token or tok.convert_ids_to_tokens(pad_id)
    backend.enable_padding(pad_id=int(pad_id), pad_token=pad_token)
    backend.enable_truncation(max_length=max_seq)
    out = root / TOKENIZER_PATH
    out.parent.mkdir(parents=True, exist_ok=True)
    backend.save(str(out))
    return TOKENIZER_PATH


def write_adapter(loaded: "LoadedModel", head: "Head", root: pathlib.Path) -> tuple[str, tuple[ParamSpec, ...]]:
    """The head's LoRA tensors in PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``.

    The config is the model's LoRA config restricted to the head's blocks
    (``layers_to_transform``) with no task type and no ``modules_to_save``: the tail's adapters
    and the task head live on the server. So ``PeftModel.from_pretrained(base_model, ADAPTER_DIR)``
    loads exactly the head's adapters, and a trained personal head written in their place too.
    """
    import copy

    import safetensors.torch

    from flexsfl.model.partition import block_of

    out = root / ADAPTER_DIR
    cfg = copy.deepcopy(loaded.model.peft_config["default"])
    cfg.layers_to_transform = list(head.block_ids)
    cfg.modules_to_save = None
    cfg.task_type = None
    cfg.save_pretrained(str(out))  # writes adapter_config.json
    canonical = head.canonical()
    tensors = {canonical[n]: p.detach().contiguous() for n, p in head.trainable()}
    safetensors.torch.save_file(tensors, str(out / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    L = loaded.info.num_blocks
    specs = tuple(
        ParamSpec(name=name, shape=tuple(t.shape), dtype="float32", block=block_of(name, L)) for name, t in tensors.items()
    )
    assert (out / ADAPTER_CONFIG_NAME).is_file()
    return ADAPTER_DIR, specs


def write_manifest(
    root: pathlib.Path,
    *,
    loaded: "LoadedModel",
    split: int,
    backends: tuple[str, ...],
    target: TargetProfile,
    optimizer: dict,
    max_batch: int,
    max_seq: int,
    programs: dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]],
    params: tuple[ParamSpec, ...],
    artifacts: dict[str, str],
    step: dict[str, str],
    tokenizer: str,
    adapter: str,
    extra: dict,
    runtime: dict | None = None,
) -> Manifest:
    """Hash every file under ``root`` and write ``manifest.json`` last, atomically."""
    files = {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(".")
    }
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        model=loaded.info,
        split=split,
        backend=backends,
        target=target,
        optimizer=optimizer,
        lora=loaded.lora,
        max_batch=max_batch,
        max_seq=max_seq,
        inputs={role: ins for role, (ins, _) in programs.items()},
        outputs={role: outs for role, (_, outs) in programs.items()},
        trainable_parameters=params,
        artifacts=artifacts,
        step=step,
        tokenizer=tokenizer,
        adapter=adapter,
        files=files,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        flexsfl_version=__version__,
        extra=extra,
        runtime=runtime or {},
    )
    atomic_write_text(root / MANIFEST_NAME, manifest.dumps())
    return manifest


def tar_bundle(root: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """``root`` -> ``out`` (.tar.gz) with one top-level directory, written atomically."""
    with atomic_path(out) as tmp, tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
        tar.add(root, arcname=root.name)
    return out
