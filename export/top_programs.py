"""The device's top (U-shaped topology) as two programs: a fused train step and an eval.

In the U-shaped step the device receives ``H`` (the server's middle output) and already holds
the labels, so nothing waits between the top's forward and its backward: one fused program does
both, as eager training would::

    top_train(h, attention_mask, labels, *params) -> (loss, logits, grad_h, *param_grads)
    top_eval (h, attention_mask, *params)         -> logits

``grad_h = dL/dH`` goes back to the server; ``param_grads`` train the top's personal adapters
(and the task head). The route is the head's (:mod:`flexsfl.export.programs`): the top is wrapped
with its loss, exported with dynamic batch/seq, and turned into a joint forward+backward graph by
``_export_forward_backward`` with ``h`` requiring grad (so the graph also returns
``GRADIENT_TO_USER_INPUT``). Nothing is cut: the train program is the joint graph with the
trainable tensors turned into inputs, the eval program the joint graph's ancestors of the logits.

The loss inside the programs is cross-entropy written with ops every runtime has (a
``logsumexp`` and a one-hot product instead of ``nll_loss``, whose backward neither the ONNX
exporter nor ExecuTorch's portable kernels cover); it is the task loss of
:func:`flexsfl.model.partition.task_loss` (mean over labelled positions, causal LM shifted, -100
ignored), and the tests compare both programs with eager autograd of that loss.

Private torch APIs are used only here, in ``programs.py`` and in ``lower_*.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch import fx
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from flexsfl.core.bundle import ProgramSpec, TensorSpec
from flexsfl.core.errors import ConfigError, ExportError
from flexsfl.export.programs import (
    BATCH,
    SEQ,
    _check_args,
    _describe,
    _first_line,
    _safe,
    _traced_bounds,
    _training_view,
    _val,
    export_program,
)

__all__ = ["TopPrograms", "build_top_programs", "export_top_programs", "portable_task_loss", "TRAIN", "EVAL"]

log = logging.getLogger("flexsfl.export.top_programs")

TRAIN = "top_train"  # program (and method) names in bundles
EVAL = "top_eval"
_WRAPPED = "top."  # prefix of the top's names inside _TopLoss
_aten = torch.ops.aten


def portable_task_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """:func:`~flexsfl.model.partition.task_loss` from elementwise ops, reductions and a one-hot.

    ``logits`` [B, C] with ``labels`` [B] (seq_cls), or [B, T, V] with [B, T] (causal_lm:
    position t predicts token t+1; label -100 matches no class and is left out of the mean).
    """
    if task == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    top = logits.detach().amax(-1, keepdim=True)  # logsumexp's gradient does not depend on the shift
    lse = (logits - top).exp().sum(-1).log() + top.squeeze(-1)
    onehot = (labels.unsqueeze(-1) == torch.arange(logits.shape[-1], device=labels.device)).to(logits.dtype)
    picked = (logits * onehot).sum(-1)
    valid = (labels != -100).to(logits.dtype)
    return ((lse - picked) * valid).sum() / valid.sum()


class _TopLoss(torch.nn.Module):
    """``(h, mask, labels) -> (loss, logits)``: the top with its loss, for the joint trace."""

    def __init__(self, top: torch.nn.Module) -> None:
        super().__init__()
        self.top = top

    def forward(self, h, attention_mask, labels):
        logits = self.top(h, attention_mask)
        return portable_task_loss(logits, labels, self.top.task), logits.detach()


@dataclasses.dataclass(frozen=True)
class TopPrograms:
    """The two programs of one top, with the specs of every input and output.

    ``train(h float32 [B,T,d], attention_mask int64 [B,T], labels int64 [B] | [B,T], *params)
    -> (loss float32 [], logits, grad_h float32 [B,T,d], *grads)`` and ``eval(h, attention_mask,
    *params) -> logits``, logits float32 [B, C] (seq_cls) or [B, T, V] (causal_lm); grads in
    ``param_names`` order. Both take every trainable tensor (``params`` may be empty: a causal
    LM top with ``u = 0`` trains nothing and only returns ``grad_h``); every other weight is a
    constant shared by both programs. Dims as in :class:`~flexsfl.export.programs.HeadPrograms`.
    """

    train: fx.GraphModule
    eval: fx.GraphModule
    param_names: tuple[str, ...]
    initial_params: tuple[torch.Tensor, ...]
    train_spec: ProgramSpec
    eval_spec: ProgramSpec
    task: str
    num_classes: int  # C for seq_cls, V for causal_lm
    max_batch: int
    max_seq: int
    hidden_size: int
    example_batch: tuple[int, int]
    build_seconds: float

    def bounds(self) -> dict[str, tuple[int, int]]:
        return _traced_bounds(self.max_batch, self.max_seq)

    def example_train_args(self, batch: int | None = None, seq: int | None = None, *, seed: int = 0):
        """Random ``(h, attention_mask, labels, *params)``, the last row half padded (causal LM
        labels -100 there)."""
        b, t = batch or self.example_batch[0], seq or self.example_batch[1]
        gen = torch.Generator().manual_seed(seed)
        h = torch.randn(b, t, self.hidden_size, generator=gen)
        mask = torch.ones(b, t, dtype=torch.int64)
        mask[-1, t // 2:] = 0
        shape = (b, t) if self.task == "causal_lm" else (b,)
        labels = torch.randint(0, self.num_classes, shape, generator=gen, dtype=torch.int64)
        if self.task == "causal_lm":
            labels[mask == 0] = -100
        return (h, mask, labels, *self.initial_params)

    def example_eval_args(self, batch: int | None = None, seq: int | None = None, *, seed: int = 0):
        h, mask, _, *params = self.example_train_args(batch, seq, seed=seed)
        return (h, mask, *params)


def build_top_programs(
    top: torch.nn.Module,
    param_names: Sequence[str],
    *,
    max_batch: int,
    max_seq: int,
    example_batch: tuple[int, int] | None = None,
) -> TopPrograms:
    """Trace ``top`` (a :class:`~flexsfl.model.partition.Top`) once with its loss; build both programs.

    ``param_names`` are names from ``top.named_parameters()`` (its LoRA tensors and task head),
    in program order; may be empty. The top is traced in eval mode with exactly ``param_names``
    requiring grad; both are restored. :class:`ConfigError` for bad arguments,
    :class:`ExportError` if it cannot be traced with dynamic batch/seq.
    """
    t0 = time.perf_counter()
    param_names = tuple(param_names)
    named = dict(top.named_parameters())
    if param_names:
        _check_args(named, param_names, max_batch, max_seq)
    elif max_batch < 1 or max_seq < 2:
        raise ConfigError(f"max_batch must be >= 1 and max_seq >= 2 (got {max_batch}, {max_seq})")
    bounds = _traced_bounds(max_batch, max_seq)
    B, T = example_batch or (2, min(16, bounds[SEQ][1]))
    if not (2 <= B <= bounds[BATCH][1] and 2 <= T <= bounds[SEQ][1]):
        raise ConfigError(f"example_batch {(B, T)} must satisfy 2 <= B <= max_batch and 2 <= T <= max_seq")
    task, d = top.task, top.hidden_size
    h = torch.zeros(B, T, d, requires_grad=True)  # requires grad: the joint graph then returns dL/dh
    mask = torch.ones(B, T, dtype=torch.int64)
    labels = torch.zeros((B, T) if task == "causal_lm" else (B,), dtype=torch.int64)
    wrapped = _TopLoss(top)
    with _training_view(top, set(param_names)):
        loss, logits = wrapped(h, mask, labels)
        want = (B, T) if task == "causal_lm" else (B,)
        if not (isinstance(logits, torch.Tensor) and logits.dtype == torch.float32 and tuple(logits.shape[:-1]) == want):
            raise ExportError(f"top must return float32 logits [{', '.join(map(str, want))}, C]; got {_describe(logits)}")
        _, *grads = torch.autograd.grad(loss, [h, *(named[n] for n in param_names)], allow_unused=True)
        unused = [n for n, g in zip(param_names, grads) if g is None]
        if unused:
            raise ExportError(f"parameter {unused[0]!r} does not affect the loss (no gradient); drop it from param_names")
    num_classes = logits.shape[-1]
    b, t = Dim(BATCH, min=bounds[BATCH][0], max=bounds[BATCH][1]), Dim(SEQ, min=bounds[SEQ][0], max=bounds[SEQ][1])
    bt = {0: b, 1: t}
    with _training_view(top, set(param_names)):
        try:
            # A causal LM is traced size-obliviously: its shifted loss has a ``seq - 1`` dim that
            # the solver would otherwise guard as >= 2 (a size-1 dim specializes), refusing
            # seq = 2. Classification is not: there it would add a ``batch != 1`` guard instead.
            with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]), \
                    torch.fx.experimental._config.patch(backed_size_oblivious=task == "causal_lm"):
                ep = torch.export.export(wrapped, (h, mask, labels), strict=False,
                                         dynamic_shapes=(bt, bt, bt if task == "causal_lm" else {0: b}))
                from torch.export.experimental import _export_forward_backward

                joint = _export_forward_backward(ep, joint_loss_index=0)
        except Exception as e:  # torch raises many types here; the user needs one line
            raise ExportError(
                f"could not trace the top with dynamic batch (1..{max_batch}) and seq (2..{max_seq}): "
                f"{type(e).__name__}: {_first_line(e)}; lower max_seq/max_batch or use eager attention"
            ) from e
    train, evaluate = _programs_of(joint, param_names)
    params = [TensorSpec(n, "float32", tuple(named[n].shape)) for n in param_names]
    hs = TensorSpec("h", "float32", (BATCH, SEQ, d))
    ms = TensorSpec("attention_mask", "int64", (BATCH, SEQ))
    ls = TensorSpec("labels", "int64", (BATCH, SEQ) if task == "causal_lm" else (BATCH,))
    lg = TensorSpec("logits", "float32", (BATCH, SEQ, num_classes) if task == "causal_lm" else (BATCH, num_classes))
    train_spec = ProgramSpec(
        (hs, ms, ls, *params),
        (TensorSpec("loss", "float32", ()), lg, TensorSpec("grad_h", "float32", hs.shape),
         *(TensorSpec(f"grad.{p.name}", "float32", p.shape) for p in params)),
    )
    progs = TopPrograms(
        train=train, eval=evaluate, param_names=param_names,
        initial_params=tuple(named[n].detach().clone() for n in param_names),
        train_spec=train_spec, eval_spec=ProgramSpec((hs, ms, *params), (lg,)), task=task, num_classes=num_classes,
        max_batch=max_batch, max_seq=max_seq, hidden_size=d, example_batch=(B, T),
        build_seconds=time.perf_counter() - t0,
    )
    log.info("top programs: %d train / %d eval nodes, %.1f s", len(train.graph.nodes), len(evaluate.graph.nodes),
             progs.build_seconds)
    return progs


def export_top_programs(programs: TopPrograms, *, transform: Callable[[fx.GraphModule], None] | None = None
                        ) -> dict[str, ExportedProgram]:
    """``{TRAIN: ..., EVAL: ...}`` as ``torch.export`` programs with dynamic ``batch``/``seq`` (for lowering)."""
    bounds = programs.bounds()
    return {
        TRAIN: export_program(TRAIN, programs.train, programs.train_spec, programs.example_train_args(), bounds,
                              transform=transform),
        EVAL: export_program(EVAL, programs.eval, programs.eval_spec, programs.example_eval_args(), bounds,
                             transform=transform),
    }


def _programs_of(joint: ExportedProgram, param_names: tuple[str, ...]) -> tuple[fx.GraphModule, fx.GraphModule]:
    """The train program (the whole joint graph) and the eval program (the logits' ancestors)."""
    graph = joint.graph_module.graph
    sig = joint.graph_signature
    nodes = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    h, mask, labels = (nodes[s.arg.name] for s in sig.input_specs if s.kind == InputKind.USER_INPUT)
    by_target = {s.target: nodes[s.arg.name] for s in sig.input_specs if s.kind == InputKind.PARAMETER}
    params = [by_target[_WRAPPED + n] for n in param_names]
    state = {**joint.state_dict, **joint.constants}
    consts = {nodes[s.arg.name]: state[s.target].detach().clone() for s in sig.input_specs
              if s.kind != InputKind.USER_INPUT and nodes[s.arg.name] not in params}
    outs = list(zip(sig.output_specs, graph.output_node().args[0]))
    kinds = {k: [n for s, n in outs if s.kind == k] for k in OutputKind}
    if len(kinds[OutputKind.GRADIENT_TO_USER_INPUT]) != 1:
        raise ExportError("the top's joint graph has no gradient for h; the top must read h")
    grads = {s.target: n for s, n in outs if s.kind == OutputKind.GRADIENT_TO_PARAMETER}
    missing = [n for n in param_names if _WRAPPED + n not in grads]
    if missing:
        raise ExportError(f"parameter {missing[0]!r} does not affect the loss (no gradient); drop it from param_names")
    (loss,), (logits,) = kinds[OutputKind.LOSS_OUTPUT], kinds[OutputKind.USER_OUTPUT]
    if logits.target is torch.ops.aten.alias.default:  # the wrapper's logits.detach()
        logits = logits.args[0]
    named_params = [(_safe(n), p) for n, p in zip(param_names, params)]
    buffers = {node: f"_c{i}" for i, node in enumerate(consts)}
    train = _copy(graph, [("h", h), ("attention_mask", mask), ("labels", labels), *named_params],
                  [loss, logits, kinds[OutputKind.GRADIENT_TO_USER_INPUT][0], *(grads[_WRAPPED + n] for n in param_names)],
                  consts, buffers)
    evaluate = _copy(graph, [("h", h), ("attention_mask", mask), *named_params], [logits], consts, buffers)
    return train, evaluate


def _copy(graph: fx.Graph, inputs: list[tuple[str, fx.Node]], outputs: list[fx.Node], consts: dict, buffers: dict
          ) -> fx.GraphModule:
    """A GraphModule computing ``outputs`` from ``inputs`` (in order), constants as buffers."""
    needed: set[fx.Node] = set()
    stack = list(outputs)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for name, node in inputs:
        env[node] = g.placeholder(name)
        env[node].meta = dict(node.meta)
    root = torch.nn.Module()

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:
            if a not in consts:
                raise ExportError(f"internal: the top's {a.name} is neither an input nor a constant; please report this")
            root.register_buffer(buffers[a], consts[a])  # the same tensor in both programs
            env[a] = g.get_attr(buffers[a])
            env[a].meta["val"] = _val(a)
        return env[a]

    for n in graph.nodes:
        if n in needed and n.op == "call_function":
            env[n] = g.node_copy(n, arg)
            env[n].meta = dict(n.meta)
            if n.target is _aten.empty_permuted.default and list(n.args[1]) == list(range(len(n.args[1]))):
                # ``ones_like`` of the loss seed, decomposed; ExecuTorch has no empty_permuted kernel
                # and an identity permutation is a plain ``empty``.
                env[n].target, env[n].args = _aten.empty.memory_format, (env[n].args[0],)
    g.output(tuple(env[n] for n in outputs))
    g.eliminate_dead_code()
    gm = fx.GraphModule(root, g)
    gm.graph.lint()
    return gm
