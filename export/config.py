"""What ``flexsfl export`` builds: :class:`ExportConfig`, each field with its help (the flags are made from it).

``max_batch`` is the largest batch the programs accept and what ExecuTorch plans its memory for
(its arena holds every activation at that batch, whatever batch a step uses), so it defaults to
``batch_size``, the batch the device trains with; the manifest records both (``max_batch`` and
``runtime.executorch.planned_batch``).

Torch-free, so the CLI can build its parser without loading the export stack.
"""

from __future__ import annotations

import dataclasses

from flexsfl.core.constants import OPTIMIZERS, TASKS
from flexsfl.core.errors import ConfigError

__all__ = ["BACKENDS", "ExportConfig"]

BACKENDS = ("ort", "executorch")


def _f(default=dataclasses.MISSING, help: str = "", **meta):  # noqa: A002 - PEFT's name for it
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    model: str = _f(help="minilm, smollm2, or a local Hugging Face model directory")
    split: int = _f(help="blocks on the device (1 <= S < L)")
    out: str = _f(help="bundle directory to create")
    top: int | None = _f(None, "U-shaped topology: the device also keeps the last U blocks + final norm + task head, "
                               "so labels never leave it (0: norm and head only); adds the top's programs", metavar="U")
    backend: str = _f("ort", "which on-device programs to build", choices=(*BACKENDS, "all"))
    target: str = _f("generic-x86_64", "generic-x86_64, rpi4, rpi5 or jetson-orin")
    task: str = _f(TASKS[0], "what the model is trained for", choices=TASKS)
    num_labels: int = _f(2, "classes for seq_cls")
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: float = _f(16.0, "LoRA scaling numerator (scale = alpha / r)")
    lora_targets: tuple[str, ...] | None = _f(None, "comma-separated module names (default: attention q,v)",
                                              metavar="NAMES")
    # Plain SGD: the cheapest on a device; the server names the optimizer of every round anyway.
    optimizer: str = _f(OPTIMIZERS[0], "default on-device optimizer (the server may override it per round)",
                        choices=OPTIMIZERS)
    lr: float = _f(1e-3, "default on-device learning rate")
    batch_size: int = _f(8, "the batch the device trains with (the server's --batch-size); --max-batch defaults to it")
    max_batch: int | None = _f(None, "programs accept 1 <= B <= max batch; ExecuTorch plans its memory for this batch "
                                     "(default: --batch-size)")
    max_seq: int = _f(128, "and 2 <= T <= max seq")
    seed: int = _f(0, "seed for new weights (task head, LoRA A)")
    tar: bool = _f(False, "also write OUT.tar.gz")
    ort_training_artifacts: bool = _f(
        True, "leave out ONNX Runtime's own training/eval/optimizer models and checkpoint (the edge runtime "
              "trains with the forward/backward pair; the checkpoint is a second copy of the head's weights)",
        flag="--no-ort-training-artifacts")
    fused_ops: bool = _f(False, "ONNX: run the forward's GELU as ONNX Runtime's fused com.microsoft::Gelu kernel "
                                "(every standard onnxruntime build has it; recorded in the manifest's runtime.ort)")
    force: bool = _f(False, "replace an existing bundle directory", cli=False)

    def __post_init__(self) -> None:
        if self.backend not in (*BACKENDS, "all"):
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)} or all, got {self.backend!r}")
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if isinstance(self.split, bool) or not isinstance(self.split, int) or self.split < 1:
            raise ConfigError(f"split must be an int >= 1 (blocks on the device), got {self.split!r}")
        if self.top is not None and (isinstance(self.top, bool) or not isinstance(self.top, int) or self.top < 0):
            raise ConfigError(f"top must be an int >= 0 (blocks the device keeps at the output end), got {self.top!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.max_batch is None:
            # ExecuTorch plans its memory for the largest batch the programs accept: by default,
            # the one the device trains with, not a bigger one it would never use.
            object.__setattr__(self, "max_batch", self.batch_size)
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_seq < 2:
            raise ConfigError(f"max_seq must be >= 2, got {self.max_seq}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.lora_r < 1:
            raise ConfigError(f"lora_r must be >= 1, got {self.lora_r}")
        if self.num_labels < 1:
            raise ConfigError(f"num_labels must be >= 1, got {self.num_labels}")

    @property
    def backends(self) -> tuple[str, ...]:
        return BACKENDS if self.backend == "all" else (self.backend,)
