"""Bundles: a directory (or ``.tar.gz``) with a strict, versioned ``manifest.json``.

A bundle holds everything one device needs to train its head for one (model, split, backend,
target): the on-device programs, the tokenizer, and the initial personal adapters in PEFT format.
The manifest lists every file with its sha256; :func:`load_bundle` checks all of them and the
schema version before anything else reads a byte, so a tampered, truncated or mismatched bundle
fails with one line naming the file, never inside a runtime.

Writing bundles is :mod:`flexsfl.export.bundle_writer`'s job; this module only reads them and must
never import torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from typing import Any

from flexsfl.core.errors import BundleError
from flexsfl.core.extract import extract_tar
from flexsfl.core.targets import TargetProfile

__all__ = [
    "SCHEMA_VERSION",
    "READABLE_SCHEMA_VERSIONS",
    "MANIFEST_NAME",
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "TensorSpec",
    "ProgramSpec",
    "ModelInfo",
    "LoraInfo",
    "ParamSpec",
    "Manifest",
    "Bundle",
    "load_bundle",
    "sha256_file",
    "layout_fingerprint",
]

log = logging.getLogger("flexsfl.bundle")

# 2 added ``runtime`` (what each backend's programs need from the device's runtime: ONNX opset, IR
# version, minimum onnxruntime); version-1 bundles still load, with no runtime requirements.
# 3: the program specs describe each program exactly as its runtime sees it: ONNX input/output
# names are the graphs' own, ExecuTorch methods take and return the same list by position, and a
# split program's trainable inputs carry the ``trainable_parameters`` names (gradients
# ``grad.<name>``), checked on load. Older bundles still load; their program names are only
# descriptive (the backends feed them by position).
SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = (1, 2, 3)
MANIFEST_NAME = "manifest.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"  # PEFT's file names, so PeftModel.from_pretrained loads it
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

_DTYPES = {"float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool"}


def _need(d: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict):
        raise BundleError(f"{MANIFEST_NAME}: {where} must be an object; re-export the bundle")
    if key not in d:
        raise BundleError(f"{MANIFEST_NAME}: missing field {where}.{key}; re-export the bundle")
    v = d[key]
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise BundleError(f"{MANIFEST_NAME}: field {where}.{key} has the wrong type; re-export the bundle")
    return v


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One program input or output. ``shape`` entries are ints or named dynamic dims ("batch")."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise BundleError(f"{MANIFEST_NAME}: tensor {self.name!r} has unknown dtype {self.dtype!r}")

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict, where: str) -> "TensorSpec":
        shape = _need(d, "shape", list, where)
        if not all(isinstance(s, (int, str)) and not isinstance(s, bool) for s in shape):
            raise BundleError(f"{MANIFEST_NAME}: {where}.shape must hold ints and dim names")
        return cls(_need(d, "name", str, where), _need(d, "dtype", str, where), tuple(shape))


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """Inputs and outputs of one on-device program (ordered as the program takes/returns them)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    id: str  # "minilm", "smollm2" or the local path it was loaded from
    revision: str  # "sha256:<hex>" of the weights, or a hub revision
    family: str  # "bert" | "gpt2" | "llama"
    num_blocks: int  # L, transformer blocks in the full model
    hidden_size: int  # d, last dim of the smashed data Z
    vocab_size: int
    task: str  # "seq_cls" | "causal_lm"
    num_labels: int  # classes for seq_cls; vocab size for causal_lm


@dataclasses.dataclass(frozen=True)
class LoraInfo:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]

    def to_json(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "target_modules": list(self.target_modules)}


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """A trainable head tensor. ``name`` is its key in ``adapter_model.safetensors`` (PEFT's naming)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    block: int  # 0-based transformer block the tensor belongs to

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "block": self.block}


@dataclasses.dataclass(frozen=True)
class Manifest:
    schema_version: int
    model: ModelInfo
    split: int  # s: the head is embeddings + blocks 0..s-1
    backend: tuple[str, ...]  # backends whose programs the bundle holds: "ort", "executorch"
    target: TargetProfile
    optimizer: dict  # default on-device optimizer: {"name": "sgd"|"adamw", "lr": ..., ...}
    lora: LoraInfo
    max_batch: int
    max_seq: int
    inputs: dict[str, tuple[TensorSpec, ...]]  # program role -> its inputs
    outputs: dict[str, tuple[TensorSpec, ...]]  # program role -> its outputs
    trainable_parameters: tuple[ParamSpec, ...]
    artifacts: dict[str, str]  # role ("ort.forward", "executorch.forward", ...) -> relative path
    step: dict[str, str]  # backend -> "split" (one forward + one backward per step) | "joint"
    tokenizer: str  # relative path of tokenizer.json
    adapter: str  # relative path of the PEFT adapter directory
    files: dict[str, str]  # relative path -> sha256 of every file but the manifest
    created: str = ""
    flexsfl_version: str = ""
    extra: dict = dataclasses.field(default_factory=dict)  # free-form notes (export timings, warnings)
    # backend -> what its programs need from the runtime, checked when the backend opens them:
    # {"ort": {"onnx_opset": 18, "onnx_ir_version": 10, "min_onnxruntime": "1.18"}}
    runtime: dict[str, dict] = dataclasses.field(default_factory=dict)

    def program(self, role: str) -> ProgramSpec:
        if role not in self.inputs or role not in self.outputs:
            raise BundleError(f"{MANIFEST_NAME}: no program {role!r} in this bundle (has: {', '.join(sorted(self.inputs))})")
        return ProgramSpec(self.inputs[role], self.outputs[role])

    @property
    def layout_hash(self) -> str:
        """What the server compares in the handshake: model, task, LoRA layout and split."""
        return layout_fingerprint(self.model, self.lora, self.split)

    def to_json(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "created": self.created,
            "flexsfl_version": self.flexsfl_version,
            "model": dataclasses.asdict(self.model),
            "split": self.split,
            "backend": list(self.backend),
            "target": self.target.to_json(),
            "optimizer": self.optimizer,
            "lora": self.lora.to_json(),
            "max_batch": self.max_batch,
            "max_seq": self.max_seq,
            "inputs": {k: [t.to_json() for t in v] for k, v in self.inputs.items()},
            "outputs": {k: [t.to_json() for t in v] for k, v in self.outputs.items()},
            "trainable_parameters": [p.to_json() for p in self.trainable_parameters],
            "artifacts": self.artifacts,
            "step": self.step,
            "tokenizer": self.tokenizer,
            "adapter": self.adapter,
            "files": self.files,
            "layout_hash": self.layout_hash,
            "extra": self.extra,
            **({"runtime": self.runtime} if self.schema_version >= 2 else {}),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        version = _need(d, "schema_version", int, "manifest")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise BundleError(
                f"{MANIFEST_NAME}: schema_version {version} is not supported (this flexsfl reads "
                f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}); re-export the bundle with this flexsfl version"
            )
        m = _need(d, "model", dict, "manifest")
        model = ModelInfo(
            id=_need(m, "id", str, "model"),
            revision=_need(m, "revision", str, "model"),
            family=_need(m, "family", str, "model"),
            num_blocks=_need(m, "num_blocks", int, "model"),
            hidden_size=_need(m, "hidden_size", int, "model"),
            vocab_size=_need(m, "vocab_size", int, "model"),
            task=_need(m, "task", str, "model"),
            num_labels=_need(m, "num_labels", int, "model"),
        )
        lo = _need(d, "lora", dict, "manifest")
        lora = LoraInfo(
            r=_need(lo, "r", int, "lora"),
            alpha=float(_need(lo, "alpha", (int, float), "lora")),
            dropout=float(_need(lo, "dropout", (int, float), "lora")),
            target_modules=tuple(_need(lo, "target_modules", list, "lora")),
        )

        def programs(key: str) -> dict[str, tuple[TensorSpec, ...]]:
            table = _need(d, key, dict, "manifest")
            return {
                role: tuple(TensorSpec.from_json(t, f"{key}.{role}[{i}]") for i, t in enumerate(specs))
                for role, specs in table.items()
            }

        params = tuple(
            ParamSpec(
                name=_need(p, "name", str, f"trainable_parameters[{i}]"),
                shape=tuple(_need(p, "shape", list, f"trainable_parameters[{i}]")),
                dtype=_need(p, "dtype", str, f"trainable_parameters[{i}]"),
                block=_need(p, "block", int, f"trainable_parameters[{i}]"),
            )
            for i, p in enumerate(_need(d, "trainable_parameters", list, "manifest"))
        )
        split = _need(d, "split", int, "manifest")
        if not 1 <= split < model.num_blocks:
            raise BundleError(f"{MANIFEST_NAME}: split {split} is outside 1..{model.num_blocks - 1}")
        man = cls(
            schema_version=version,
            model=model,
            split=split,
            backend=tuple(_need(d, "backend", list, "manifest")),
            target=TargetProfile.from_json(_need(d, "target", dict, "manifest")),
            optimizer=_need(d, "optimizer", dict, "manifest"),
            lora=lora,
            max_batch=_need(d, "max_batch", int, "manifest"),
            max_seq=_need(d, "max_seq", int, "manifest"),
            inputs=programs("inputs"),
            outputs=programs("outputs"),
            trainable_parameters=params,
            artifacts=_need(d, "artifacts", dict, "manifest"),
            step=_need(d, "step", dict, "manifest"),
            tokenizer=_need(d, "tokenizer", str, "manifest"),
            adapter=_need(d, "adapter", str, "manifest"),
            files=_need(d, "files", dict, "manifest"),
            created=d.get("created", ""),
            flexsfl_version=d.get("flexsfl_version", ""),
            extra=d.get("extra", {}),
            runtime=_runtime(_need(d, "runtime", dict, "manifest")) if version >= 2 else {},
        )
        stated = d.get("layout_hash")
        if stated is not None and stated != man.layout_hash:
            raise BundleError(f"{MANIFEST_NAME}: layout_hash does not match its model/lora/split fields (edited by hand?)")
        if version >= 3:
            _check_program_names(man)
        return man


def _check_program_names(m: Manifest) -> None:
    """Schema 3: every split program names its trainable inputs (and gradients) as
    ``trainable_parameters`` does, in that order, so a client can build a feed from the manifest."""
    names = [p.name for p in m.trainable_parameters]
    grads = [f"grad.{n}" for n in names]
    for role in sorted(m.inputs):
        backend, _, method = role.partition(".")
        if method not in ("forward", "backward"):
            continue
        ins, outs = m.inputs[role], m.outputs.get(role, ())
        got = [t.name for t in ins[len(ins) - len(names):]] if len(ins) >= len(names) else [t.name for t in ins]
        bad = got != names or (method == "backward" and [t.name for t in outs] != grads)
        if bad:
            raise BundleError(f"{MANIFEST_NAME}: program {role!r} does not name its trainable inputs/gradients as "
                              "trainable_parameters does; re-export the bundle")


_RUNTIME_FIELDS = {"ort": {"onnx_opset": int, "onnx_ir_version": int, "min_onnxruntime": str}}


def _runtime(table: dict) -> dict[str, dict]:
    """The manifest's ``runtime`` table, checked: known backends must state every field, typed."""
    for backend, need in table.items():
        where = f"runtime.{backend}"
        for key, kind in _RUNTIME_FIELDS.get(backend, {}).items():
            _need(need, key, kind, where)
        if backend == "ort" and not all(p.isdigit() for p in need["min_onnxruntime"].split(".")):
            raise BundleError(f"{MANIFEST_NAME}: {where}.min_onnxruntime {need['min_onnxruntime']!r} is not a "
                              "version like 1.18; re-export the bundle")
    return table


def layout_fingerprint(model: ModelInfo, lora: LoraInfo, split: int) -> str:
    """sha256 over everything that must agree between a client's head and the server's tail."""
    key = {
        "model": {k: getattr(model, k) for k in ("revision", "family", "num_blocks", "hidden_size", "task", "num_labels")},
        "lora": lora.to_json(),
        "split": split,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _safe_relpath(rel: str) -> str:
    p = pathlib.PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel in ("", "."):
        raise BundleError(f"{MANIFEST_NAME}: path {rel!r} escapes the bundle; the bundle was tampered with")
    return rel


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk. Create it with :func:`load_bundle`."""

    root: pathlib.Path
    manifest: Manifest
    manifest_sha256: str

    def path(self, role: str) -> pathlib.Path:
        """Absolute path of an artifact by role (``"ort.forward"``), raising a clear error if absent."""
        try:
            return self.root / self.manifest.artifacts[role]
        except KeyError:
            have = ", ".join(sorted(self.manifest.artifacts))
            raise BundleError(f"bundle {self.root}: no artifact {role!r} (has: {have}); export it with that backend") from None

    @property
    def tokenizer_path(self) -> pathlib.Path:
        return self.root / self.manifest.tokenizer

    @property
    def adapter_dir(self) -> pathlib.Path:
        return self.root / self.manifest.adapter

    def summary(self) -> str:
        m = self.manifest
        size = sum((self.root / f).stat().st_size for f in m.files)
        lines = [
            f"bundle   {self.root}",
            f"model    {m.model.id} ({m.model.family}, {m.model.num_blocks} blocks, d={m.model.hidden_size}, "
            f"task {m.model.task}/{m.model.num_labels})",
            f"split    {m.split} (head = embeddings + blocks 1..{m.split})",
            "backend  " + ", ".join(f"{b} ({m.step.get(b, '?')} step)" for b in m.backend),
            f"target   {m.target.name} ({m.target.arch}, {m.target.cores} cores, {m.target.memory_mb} MB)",
            f"lora     r={m.lora.r} alpha={m.lora.alpha:g} on {', '.join(m.lora.target_modules)}; "
            f"{sum(_numel(p.shape) for p in m.trainable_parameters):,} trainable values in "
            f"{len(m.trainable_parameters)} tensors",
            f"limits   batch <= {m.max_batch}, seq <= {m.max_seq}",
            f"files    {len(m.files)} verified, {size / 1e6:.1f} MB",
        ]
        return "\n".join(lines)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def load_bundle(path: str | os.PathLike, *, cache: str | os.PathLike | None = None) -> Bundle:
    """Open and verify a bundle directory or ``.tar.gz``.

    A ``.tar.gz`` is unpacked into a private cache by :func:`~flexsfl.core.extract.extract_tar`
    (``cache``: its directory). Checks the schema version, that every file the manifest lists
    exists as a plain file (no symbolic links) with its sha256, that
    every artifact, the tokenizer and the adapter are among them, and that no path escapes the
    bundle. Raises :class:`BundleError` naming the first file at fault.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise BundleError(f"{path}: no such bundle; export one with `flexsfl export`")
    if path.is_file():
        root = extract_tar(path, sha256_file(path), cache)
    else:
        root = path
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing; {path} is not a flexsfl bundle")
    raw = mpath.read_bytes()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e.__class__.__name__} at byte {getattr(e, 'pos', '?')}); the bundle is damaged") from None
    manifest = Manifest.from_json(data)

    real_root = root.resolve()
    for rel, digest in manifest.files.items():
        f = root / _safe_relpath(rel)
        if f.is_symlink() or (f.exists() and not f.resolve().is_relative_to(real_root)):
            # A link could point anywhere (a file of the user's, a device): bundles hold plain files only.
            raise BundleError(f"{f}: is a symbolic link (or under one); a bundle holds plain files only, copy or export it again")
        if not f.is_file():
            raise BundleError(f"{f}: listed in the manifest but missing; the bundle is incomplete, copy it again")
        if sha256_file(f) != digest:
            raise BundleError(f"{f}: sha256 mismatch (tampered with or truncated); copy or export the bundle again")
    listed = set(manifest.files)
    for role, rel in manifest.artifacts.items():
        if rel not in listed:
            raise BundleError(f"{MANIFEST_NAME}: artifact {role!r} -> {rel!r} is not covered by the checksums")
    if manifest.tokenizer not in listed:
        raise BundleError(f"{MANIFEST_NAME}: tokenizer {manifest.tokenizer!r} is not covered by the checksums")
    for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        rel = str(pathlib.PurePosixPath(manifest.adapter) / name)
        if rel not in listed:
            raise BundleError(f"{MANIFEST_NAME}: adapter file {rel!r} is not covered by the checksums")
    log.debug("verified bundle %s (%d files)", root, len(listed))
    return Bundle(root=root, manifest=manifest, manifest_sha256=hashlib.sha256(raw).hexdigest())
