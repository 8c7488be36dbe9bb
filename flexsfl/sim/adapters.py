"""A client's personalized model out of a federation, as one PEFT adapter for the whole model.

FlexP-SFL leaves a client's model in two places: its personal head adapters ``θ_k`` (blocks
``0..s-1``, and the top ``L-u..L-1`` + task head in the U-shaped topology) on the device, and
the global middle/tail adapters and task head ``φ`` on the server. :func:`merge_personal`
writes their union as a standard PEFT LoRA adapter (``adapter_config.json`` +
``adapter_model.safetensors``, every block): ``PeftModel.from_pretrained(base, DIR)`` then
computes exactly the split model's logits, ``tail_φ(head_θk(x))``. With ``full=True`` the
adapter is also merged into the base weights and saved as a plain ``save_pretrained`` model.

Inputs, read as files (no server or device code runs):

- the bundle the client trained with (model id, task, LoRA settings, split);
- ``personal``: a device state directory (``personal.safetensors``: ``theta/`` and ``top/``
  tensors), a PEFT adapter directory (``adapter_model.safetensors``), or a ``.safetensors`` file
  (the server's ``personal/<id>.safetensors``);
- the server's state directory (``global.safetensors``).

Tensor names are canonical (the PEFT adapter keys), so the merge is a dictionary union: every
tensor of the global model, with the personal ones in place of the global ones they name.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import numpy as np

from flexsfl.core.atomic import atomic_path
from flexsfl.core.bundle import load_bundle
from flexsfl.core.errors import ConfigError

__all__ = ["read_personal", "read_global", "merge_personal", "base_model_dir", "load_for_generation"]

_DEVICE_STATE = "personal.safetensors"
_ADAPTER_FILE = "adapter_model.safetensors"
_DROP = ("phi/", "opt/")  # a device's copy of the global head it started from, its optimizer state
_KEEP = ("theta/", "top/")  # its personal head and (U-shaped) top


def _load(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError, OSError
        raise ConfigError(f"{path}: cannot read the tensors ({e}); pass the file the run wrote") from None


def read_personal(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """A client's personal tensors by canonical name, from a device state dir, an adapter dir or a file."""
    p = pathlib.Path(path)
    if p.is_dir():
        if (p / _DEVICE_STATE).is_file():
            p = p / _DEVICE_STATE
        elif (p / _ADAPTER_FILE).is_file():
            p = p / _ADAPTER_FILE
        else:
            raise ConfigError(f"{path}: holds neither {_DEVICE_STATE} (a device state dir) nor {_ADAPTER_FILE} "
                              "(an adapter dir); pass the device's --state-dir")
    elif not p.is_file():
        raise ConfigError(f"{path}: no such file or directory; pass the device's --state-dir or an adapter dir")
    out: dict[str, np.ndarray] = {}
    for k, v in _load(p).items():
        if k.startswith(_DROP):
            continue
        for prefix in _KEEP:
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    if not out:
        raise ConfigError(f"{p}: holds no personal tensors; was this device ever trained?")
    return out


def read_global(state_dir: str | pathlib.Path) -> dict[str, np.ndarray]:
    """The server's global adapters and task head (``global.safetensors`` in its state dir)."""
    p = pathlib.Path(state_dir) / "global.safetensors"
    if not p.is_file():
        raise ConfigError(f"{p}: missing; pass the server's --state-dir after at least one round")
    return _load(p)


def base_model_dir(model_id: str) -> pathlib.Path:
    """The Hugging Face directory holding the base weights of a bundle's model (GGUF: its fp32 cache)."""
    from flexsfl.core.models import resolve_model
    from flexsfl.model.loading import gguf_cache

    src = resolve_model(model_id)
    d = gguf_cache(src) if src.gguf_file else src.path
    if not (any(d.glob("*.safetensors")) or any(d.glob("*.bin"))):
        raise ConfigError(f"{d}: the base model has no weights (randomly initialised); a PEFT adapter needs a base "
                          "model with weights, train from a model directory that has them")
    return d


def merge_personal(bundle: str | pathlib.Path, personal: str | pathlib.Path, server_state: str | pathlib.Path,
                   out: str | pathlib.Path, *, full: bool = False, force: bool = False) -> pathlib.Path:
    """Write the client's whole personalized model as one PEFT adapter in ``out`` (see the module doc).

    The adapter's ``base_model_name_or_path`` is the base model's directory; the tokenizer is
    saved beside it. ``full``: also merge the adapter into the base weights and save the full
    model in ``out/merged``. Raises :class:`ConfigError` (one line) for a personal state that does
    not fit the bundle's model, or an ``out`` that exists without ``force``.
    """
    from peft import LoraConfig, TaskType

    b = load_bundle(bundle)
    m = b.manifest
    out = pathlib.Path(out)
    if out.exists() and not force:
        raise ConfigError(f"{out}: already exists; choose another --out or remove it")
    glob, pers = read_global(server_state), read_personal(personal)
    unknown = sorted(set(pers) - set(glob))
    if unknown:
        raise ConfigError(f"{personal}: tensor {unknown[0]!r} is not in the server's model ({len(unknown)} such); "
                          "pass the personal state of a client of this server")
    heads = {p.name for p in m.trainable_parameters}
    missing = sorted(heads - set(pers))
    if missing:
        raise ConfigError(f"{personal}: lacks {missing[0]!r} of bundle {b.root.name} ({len(missing)} missing); "
                          "pass the state of a device that ran this bundle")
    tensors = {**glob, **pers}
    base = base_model_dir(m.model.id)
    family, task = m.model.family, m.model.task
    head_module = "classifier" if family == "bert" else "score"
    cfg = LoraConfig(r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                     target_modules=list(m.lora.target_modules), fan_in_fan_out=family == "gpt2",
                     task_type=TaskType.SEQ_CLS if task == "seq_cls" else TaskType.CAUSAL_LM,
                     modules_to_save=[head_module] if task == "seq_cls" else None)
    cfg.base_model_name_or_path = str(base)
    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    from safetensors.numpy import save_file

    cfg.save_pretrained(str(out))
    with atomic_path(out / _ADAPTER_FILE) as tmp:
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(tensors.items())}, str(tmp),
                  metadata={"format": "pt"})
    tok = _tokenizer(base, b)
    tok.save_pretrained(str(out))
    (out / "flexsfl-merge.json").write_text(json.dumps({
        "bundle": str(b.root), "model": m.model.id, "revision": m.model.revision, "task": task, "split": m.split,
        "num_labels": m.model.num_labels, "personal": sorted(pers), "tensors": len(tensors)}, indent=2) + "\n")
    if full:
        model = load_for_generation(out) if task == "causal_lm" else _load_peft(out, task, m.model.num_labels)
        model.merge_and_unload().save_pretrained(str(out / "merged"))
        tok.save_pretrained(str(out / "merged"))
    return out


def _tokenizer(base: pathlib.Path, b) -> Any:
    import transformers

    if any((base / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return transformers.AutoTokenizer.from_pretrained(str(base))
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(b.tokenizer_path))


def _load_peft(adapter_dir: pathlib.Path, task: str, num_labels: int) -> Any:
    import torch
    import transformers
    from peft import PeftModel

    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar on a command's output
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    auto = transformers.AutoModelForCausalLM if task == "causal_lm" else transformers.AutoModelForSequenceClassification
    kw = {} if task == "causal_lm" else {"num_labels": num_labels}
    base = auto.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32, **kw)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def load_for_generation(model_dir: str | pathlib.Path) -> Any:
    """A causal LM from a merged adapter dir (base + PEFT adapter) or a full ``save_pretrained`` dir, eval mode."""
    import torch
    import transformers

    d = pathlib.Path(model_dir)
    if (d / "adapter_config.json").is_file():
        return _load_peft(d, "causal_lm", 0)
    if (d / "config.json").is_file():
        transformers.utils.logging.disable_progress_bar()
        return transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    raise ConfigError(f"{model_dir}: neither a PEFT adapter dir (adapter_config.json) nor a model dir (config.json); "
                      "pass the --out of `flexsfl adapters merge`")
