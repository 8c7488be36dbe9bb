"""What one simulated federation runs: :class:`SimConfig`, each field with its help (the flags of
``flexsfl simulate`` and ``flexsfl demo`` are made from it), and :data:`DEMO`, the README's run.

Torch-free and cheap to import: the CLI builds its parsers from it.
"""

from __future__ import annotations

import dataclasses

from flexsfl.core.alignment import check_alignment
from flexsfl.core.constants import ALIGN_LAMBDA, DITTO_MU, OPTIMIZERS, TASKS, TRAIN_OPTIMIZER
from flexsfl.core.errors import ConfigError
from flexsfl.core.wire.tensors import ENCODINGS
from flexsfl.server_backend.baselines import check_fedrep_steps
from flexsfl.server_backend.strategy import STRATEGIES as _STRATEGY_CLASSES
from flexsfl.server_backend.strategy import TOPOLOGIES
from flexsfl.sim.data.partition import SCHEMES

__all__ = ["STRATEGIES", "TOPOLOGIES", "SIM_BACKENDS", "SimConfig", "DEMO", "DEMO_LM"]

STRATEGIES = tuple(_STRATEGY_CLASSES)  # flexpsfl, splitfed, fedavg, local: the server's registry
SIM_BACKENDS = ("ort", "executorch")  # the device runtimes a simulated client runs


def _f(default, help: str, **meta):  # noqa: A002 - PEFT's name for it
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass(frozen=True)
class SimConfig:
    strategy: str = _f("flexpsfl", "FlexP-SFL or one of its baselines", choices=STRATEGIES)
    model: str = _f("minilm", "minilm, smollm2 or a HF directory")
    task: str = _f("seq_cls", "seq_cls (classify the labels), or causal_lm (each client fine-tunes the LM on its own "
                   "texts; perplexity instead of accuracy)", choices=(*TASKS, "causal-lm"))
    data: str = _f("vader", "vader, rotten, or a CSV/JSONL file")
    partition: str = _f("natural", "how the data are split among clients", choices=SCHEMES)
    alpha: float = _f(0.5, "Dirichlet concentration (smaller = more label skew)")
    clients: int = _f(4, "number of clients K")
    rounds: int = _f(8, "federated rounds")
    local_steps: int = _f(10, "tau: client steps per round")
    batch_size: int = _f(16, "client batch size")
    lr: float = _f(5e-4, "client (and tail) learning rate")
    optimizer: str = _f(TRAIN_OPTIMIZER, "client (and tail) optimizer", choices=OPTIMIZERS)
    align_lambda: float = _f(ALIGN_LAMBDA, "weight of the alignment term: its size relative to the task gradient (0: none)")
    fedrep_head_steps: int = _f(5, "strategy fedrep: of each round's local steps, the first N train the task head alone "
                                "(body frozen), the rest the body alone (head frozen)")
    ditto_mu: float = _f(DITTO_MU, "strategy ditto: proximal weight mu of each personal model towards the round's global "
                         "model (loss + mu/2 ||v - w||^2)")
    alignment: str = _f("feature_kl", "where the alignment term is computed: feature-kl (on the device, KL of the head's "
                         "features Z' and Z) or logit-kl (on the server, KL of the global tail's logits for Z' and Z; "
                         "devices send Z' with Z; head/tail only)", choices=("feature-kl", "logit-kl"), flag="--align")
    align_every: int = _f(1, "devices compute the alignment reference Z' (and apply the term) every N-th local step only")
    align_top: bool = _f(False, "U-shaped devices also apply the alignment term at the top's input H (H' = the global "
                         "middle of Z'; Z' goes up with Z, H' comes down with H); needs --topology u and --align-lambda > 0")
    splits: tuple[int, ...] | None = _f(None, "comma-separated split per client (or one for all); default: from --profiles",
                                        metavar="S[,...]")
    profiles: tuple[str, ...] | None = _f(
        None, "comma-separated device profile per client (rpi4, rpi5, jetson-orin, ...); the planner picks each split",
        metavar="NAME[,...]")
    topology: str = _f("head-tail", "head-tail: the server holds the output layers and sees the labels; u: each device "
                       "also keeps the last blocks + task head, personal, and its labels (strategy flexpsfl-u)",
                       choices=TOPOLOGIES)
    tops: tuple[int, ...] | None = _f(None, "U-shaped: comma-separated top blocks per client (or one for all); default: "
                                      "from --profiles, or 0 with --splits", metavar="U[,...]")
    backend: str = _f("ort", "device runtime of every client", choices=SIM_BACKENDS)
    encoding: str = _f("fp32", "transfer encoding of Z and g", choices=ENCODINGS)
    max_train: int | None = _f(400, "training examples per client")
    max_test: int | None = _f(100, "test examples per client")
    max_seq: int = _f(64, "tokens per example")
    eval_every: int = _f(1, "evaluate personal models on the union test set every N rounds (0: last only)")
    score_every: int = _f(1, "the devices score their own test split (personal accuracy or perplexity) every N-th round "
                          "and in the last", metavar="N")
    seed: int = _f(0, "seed of the partition, the new weights and the data order")
    out: str = _f("results/simulate", "results directory")
    in_process: bool = _f(False, "run clients as tasks of this process (fast tests only)")
    threads: int = _f(1, "threads per client process and for the server's tail")
    batching: bool = _f(True, "run every server step on its own (no cross-client batching)", flag="--no-batching")
    server_step_every: int = _f(1, "one server optimizer step per K client steps in the order received (1: sequential "
                                "split learning; a group steps on the mean of its clients' gradients)", metavar="K")
    target_acc: float = _f(0.75, "personalized accuracy for 'time/bytes to reach' in the summary")
    target_ppl: float | None = _f(None, "causal LM: personal perplexity (mean over clients) for 'time/bytes to reach'")
    num_labels: int | None = _f(None, "classes of the classifier (default: as many as the data's labels; a label "
                                "outside 0..N-1 is refused before anything is exported)")
    bundle_cache: str | None = _f(None, "reuse exported bundles across runs (default: <cache>/bundles)", cli=False)
    bundle_seed: int | None = _f(None, "seed of the exported bundles' new weights (default: seed); every strategy "
                                 "overwrites them with the server's seeded model at the first round, so a benchmark "
                                 "reuses one export across seeds: for a model with pretrained weights only (a "
                                 "weightless model's body comes from the seed, and the server refuses its bundle)",
                                 cli=False)
    min_examples: int | None = _f(None, "dirichlet: redraw the label proportions until every client holds at least "
                                  "this many examples", cli=False)
    global_every_round: bool = _f(True, "score the global model on the union test set after every round (False: "
                                  "after the last only; a benchmark that plots the clients' own curves)", cli=False)

    def __post_init__(self) -> None:
        if self.task == "causal-lm":
            object.__setattr__(self, "task", "causal_lm")  # the demo's spelling
        # One name for one run: FlexP-SFL on U-shaped clients is strategy flexpsfl-u, topology u.
        if self.strategy == "flexpsfl-u" or (self.strategy == "flexpsfl" and self.topology == "u"):
            object.__setattr__(self, "strategy", "flexpsfl-u")
            object.__setattr__(self, "topology", "u")
        for name, allowed in (("task", TASKS), ("strategy", STRATEGIES), ("partition", SCHEMES), ("optimizer", OPTIMIZERS),
                              ("backend", SIM_BACKENDS), ("encoding", ENCODINGS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("clients", "rounds", "local_steps", "batch_size", "threads", "num_labels", "align_every",
                     "server_step_every", "score_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_seq < 2:
            raise ConfigError(f"max_seq must be >= 2, got {self.max_seq}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.splits is not None and len(self.splits) not in (1, self.clients):
            raise ConfigError(f"splits needs 1 or {self.clients} values (one per client), got {len(self.splits)}")
        if self.profiles is not None and len(self.profiles) != self.clients:
            raise ConfigError(f"profiles needs {self.clients} names (one per client), got {len(self.profiles)}")
        if self.topology not in TOPOLOGIES:
            raise ConfigError(f"topology must be one of {', '.join(TOPOLOGIES)}, got {self.topology!r}")
        if self.strategy == "fedrep":
            check_fedrep_steps(self.fedrep_head_steps, self.local_steps)
        if self.ditto_mu < 0:
            raise ConfigError(f"ditto_mu must be >= 0, got {self.ditto_mu}")
        if self.topology == "u" and self.strategy == "splitfed":
            raise ConfigError("splitfed trains one shared model with the labels on the server; use --topology head-tail, "
                              "or strategy flexpsfl-u")
        if self.align_top and (self.topology != "u" or not self.align_lambda > 0):
            raise ConfigError("--align-top is the alignment term at a U-shaped device's top: add --topology u and "
                              "--align-lambda > 0")
        object.__setattr__(self, "alignment", check_alignment(self.alignment, "--align"))
        if self.alignment == "logit_kl" and self.topology == "u":
            raise ConfigError("--align logit-kl is for head/tail clients (the server holds their logits); a U-shaped "
                              "device's top fuses a hard-label loss: use --align feature-kl with --topology u")
        if self.alignment == "logit_kl" and self.align_every > 1:
            raise ConfigError("--align logit-kl sends Z' with every step; --align-every is for feature-kl")
        if self.topology != "u" and self.tops is not None:
            raise ConfigError("--tops is for U-shaped clients: add --topology u")
        if self.tops is not None and (len(self.tops) not in (1, self.clients) or min(self.tops) < 0):
            raise ConfigError(f"tops needs 1 or {self.clients} values >= 0 (one per client), got {list(self.tops)}")


# The README's main command: 4 VADER domains as 4 devices of different kinds, so splits differ.
DEMO = SimConfig(
    strategy="flexpsfl", model="minilm", data="vader", partition="natural", clients=4, rounds=5, local_steps=15,
    batch_size=8, lr=2e-3, optimizer="adamw", align_lambda=ALIGN_LAMBDA, profiles=("rpi4", "rpi4", "rpi5", "jetson-orin"),
    backend="ort", max_train=300, max_test=80, max_seq=48, eval_every=0, out="results/demo",
)

# ``flexsfl demo --task causal-lm``: SmolLM2 fine-tuned on 4 VADER domains' raw text (one per device),
# pinned splits, sized to finish in minutes on 2 cores once the model cache is warm.
DEMO_LM = SimConfig(
    strategy="flexpsfl", model="smollm2", task="causal_lm", data="vader", partition="natural", clients=4, rounds=2,
    local_steps=6, batch_size=4, lr=1e-3, optimizer="adamw", splits=(2, 4, 6, 8), backend="ort", max_train=48,
    max_test=16, max_seq=32, eval_every=0, out="results/demo-llm",
)
