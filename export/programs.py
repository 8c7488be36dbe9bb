"""Split a LoRA head into a forward program and a backward program (one forward per step).

A client step is ``z = head(x; θ)`` → send ``z`` → wait for ``G = dL/dz`` → backpropagate.
A fused forward+backward program would run the forward a second time once ``G`` arrives; here
the joint graph is cut in two, as AOTAutograd does for eager training::

    forward (input_ids, attention_mask, *params)        -> (z, *saved)
    backward(*saved, grad_z, *params)                   -> (*param_grads)

``saved`` are the activations the backward needs; the backward never recomputes the forward.

How (and why this route): the head is wrapped so the loss is ``Σ head(x)·G`` (its gradient
w.r.t. θ is exactly the vector-Jacobian product), exported with dynamic batch/seq by
``torch.export`` and turned into a joint forward+backward graph in core ATen by
``_export_forward_backward`` — the same entry ExecuTorch's own training examples use, and it
keeps symbolic shapes. AOTAutograd's partitioners (``default_partition``,
``min_cut_rematerialization_partition``) want its own joint format and hand SymInts to the
backward as extra inputs, which neither ExecuTorch nor ONNX can take; so the cut is done here,
on the export graph:

* backward nodes: everything on the path from ``G`` to a parameter gradient;
* forward-side values the backward reads are *saved* (forward outputs) only if the forward
  computes them anyway for ``z``; the rest is computed in the backward, as eager autograd
  does: what depends only on weights (weight transposes), views and copies of saved values,
  and backward-only math on them (gelu's derivative). So the forward -- on the critical path,
  before ``z`` can be sent -- does exactly the eager forward's FLOPs, the backward exactly the
  eager backward's, and the saved activations take less memory than eager autograd's
  (tests/export/test_programs.py checks all three);
* SymInts the backward needs are re-derived from ``grad_z``'s dims (``grad_z`` has the same
  ``[batch, seq, d]`` as ``z``); ``*_like`` ops become ``full`` of their symbolic shape so the
  loss itself is never recomputed;
* a saved tensor whose shape has a composite dim (``batch*seq``, ``4*batch``) is reshaped to
  plain dims on the way out and back on the way in, so every program input has only ``batch``,
  ``seq`` and int dims — what ``torch.export`` (and ExecuTorch's planner) can bound.

Private torch APIs are used only in this module and in ``lower_*.py``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import operator
import time
from collections.abc import Callable, Iterator, Sequence

import sympy
import torch
from torch import fx
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from flexsfl.core.bundle import ProgramSpec, TensorSpec
from flexsfl.core.errors import ConfigError, ExportError

__all__ = ["HeadPrograms", "build_head_programs", "export_programs", "export_program", "with_canonical_names",
           "BATCH", "SEQ"]

log = logging.getLogger("flexsfl.export.programs")

BATCH = "batch"  # dynamic dim names used in every TensorSpec
SEQ = "seq"
MIN_SEQ = 2  # torch.export specializes size-1 dims, and a 1-token sequence is no use for training

_aten = torch.ops.aten

# Ops whose output is a view, a metadata-only change or a plain copy of their first input
# (``clone`` is eval-mode dropout and ``.contiguous()``): when the backward needs one of these
# of a forward value, it recomputes it from that value instead of saving a second tensor with
# the same data.
_VIEW_OPS = {
    _aten.clone.default,
    _aten.view.default,
    _aten._unsafe_view.default,
    _aten.reshape.default,
    _aten.permute.default,
    _aten.t.default,
    _aten.transpose.int,
    _aten.unsqueeze.default,
    _aten.squeeze.dim,
    _aten.squeeze.dims,
    _aten.expand.default,
    _aten.alias.default,
    _aten.slice.Tensor,
    _aten.select.int,
}
# Ops that read only their input's metadata (shape/dtype), rewritten to ``full``.
_LIKE_OPS = {
    _aten.full_like.default: None,  # fill value is args[1]
    _aten.zeros_like.default: 0.0,
    _aten.ones_like.default: 1.0,
}


@dataclasses.dataclass(frozen=True)
class HeadPrograms:
    """The two programs of one head, with the specs of every input and output.

    ``forward(input_ids int64 [B,T], attention_mask int64 [B,T], *params) -> (z float32 [B,T,d], *saved)``
    ``backward(*saved, grad_z float32 [B,T,d], *params) -> (*grads)``, grads in ``param_names`` order.

    ``params`` are the trainable tensors in ``param_names`` order (all of them, in both
    programs, even where one does not read some); every other weight of the head is a constant
    inside the programs. Dims in the specs are ints or :data:`BATCH` / :data:`SEQ`, with
    ``1 <= batch <= max_batch`` and ``2 <= seq <= max_seq``.
    """

    forward: fx.GraphModule
    backward: fx.GraphModule
    param_names: tuple[str, ...]
    initial_params: tuple[torch.Tensor, ...]  # θ at export time (detached copies)
    forward_spec: ProgramSpec
    backward_spec: ProgramSpec
    max_batch: int
    max_seq: int
    hidden_size: int
    example_batch: tuple[int, int]  # (B, T) the programs were traced at
    vocab_size: int  # token ids the examples draw from: the head's first embedding's rows
    build_seconds: float

    @property
    def num_saved(self) -> int:
        return len(self.forward_spec.outputs) - 1

    def bounds(self) -> dict[str, tuple[int, int]]:
        """Traced (min, max) of :data:`BATCH` and :data:`SEQ` (see :func:`_traced_bounds`)."""
        return _traced_bounds(self.max_batch, self.max_seq)

    def dims(self) -> dict[str, Dim]:
        """Fresh ``torch.export`` dims for :data:`BATCH` and :data:`SEQ` with the traced bounds."""
        return {name: Dim(name, min=lo, max=hi) for name, (lo, hi) in self.bounds().items()}

    def example_forward_args(self, batch: int | None = None, seq: int | None = None, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random ``(input_ids, attention_mask, *params)`` with the last row half padded.

        ``batch``/``seq`` default to the traced example's.
        """
        batch, seq = batch or self.example_batch[0], seq or self.example_batch[1]
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.vocab_size, (batch, seq), generator=gen, dtype=torch.int64)
        mask = torch.ones(batch, seq, dtype=torch.int64)
        mask[-1, seq // 2 :] = 0
        return (ids, mask, *self.initial_params)

    def example_backward_args(self, batch: int | None = None, seq: int | None = None, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """``(*saved, grad_z, *params)`` from running the forward program on example inputs."""
        fwd = self.example_forward_args(batch, seq, seed=seed)
        with torch.no_grad():
            z, *saved = self.forward(*fwd)
        grad_z = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed + 1))
        # Fresh contiguous tensors, as a runtime passes them: some outputs are views (of a
        # split), and torch.export would trace their bases as extra dynamic inputs.
        saved = [t.clone(memory_format=torch.contiguous_format) for t in saved]
        return (*saved, grad_z, *self.initial_params)


def build_head_programs(
    head: torch.nn.Module,
    param_names: Sequence[str],
    *,
    max_batch: int,
    max_seq: int,
    example_batch: tuple[int, int] | None = None,
) -> HeadPrograms:
    """Trace ``head`` once and split its joint graph into forward and backward programs.

    ``head.forward(input_ids int64 [B,T], attention_mask int64 [B,T]) -> z float32 [B,T,d]``;
    ``param_names`` are names from ``head.named_parameters()`` (the LoRA tensors), in the order
    the programs take them. The head is traced in eval mode (no dropout) with its
    ``requires_grad`` flags temporarily set to exactly ``param_names``; both are restored.
    Raises :class:`ConfigError` for bad arguments and :class:`ExportError` if the head cannot be
    traced with dynamic batch/seq.
    """
    t0 = time.perf_counter()
    param_names = tuple(param_names)
    named = dict(head.named_parameters())
    _check_args(named, param_names, max_batch, max_seq)
    bounds = _traced_bounds(max_batch, max_seq)
    B, T = example_batch or (2, min(16, bounds[SEQ][1]))
    if not (2 <= B <= bounds[BATCH][1] and 2 <= T <= bounds[SEQ][1]):
        raise ConfigError(f"example_batch {(B, T)} must satisfy 2 <= B <= max_batch and 2 <= T <= max_seq")
    ids = torch.zeros(B, T, dtype=torch.int64)
    mask = torch.ones(B, T, dtype=torch.int64)
    with _training_view(head, set(param_names)):
        z = head(ids, mask)
        if not (isinstance(z, torch.Tensor) and z.dtype == torch.float32 and z.dim() == 3 and tuple(z.shape[:2]) == (B, T)):
            raise ExportError(f"head must return z float32 [B,T,d]; it returned {_describe(z)} for a [{B},{T}] batch")
        # A trainable tensor z does not depend on would get no gradient (and no program input).
        leaves = [named[n] for n in param_names]
        grads = torch.autograd.grad(z, leaves, torch.ones_like(z), allow_unused=True) if z.requires_grad else [None] * len(leaves)
        unused = [n for n, g in zip(param_names, grads) if g is None]
        if unused:
            raise ExportError(f"parameter {unused[0]!r} does not affect z (no gradient); drop it from param_names")
    d = z.shape[2]

    dyn = {i: Dim(name, min=lo, max=hi) for i, (name, (lo, hi)) in enumerate(bounds.items())}
    with _training_view(head, set(param_names)):
        try:
            # sdpa's fused kernels have no decomposition that keeps views legal under the
            # joint trace; the math kernel does (ExecuTorch's examples do the same).
            with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
                ep = torch.export.export(
                    _SurrogateLoss(head), (ids, mask, torch.zeros(B, T, d)), dynamic_shapes=(dyn, dyn, dyn), strict=False
                )
                # Joint forward+backward graph in core ATen; symbolic shapes are kept.
                from torch.export.experimental import _export_forward_backward

                joint = _export_forward_backward(ep, joint_loss_index=0)
        except Exception as e:  # torch raises many types here; the user needs one line
            raise ExportError(
                f"could not trace the head with dynamic batch (1..{max_batch}) and seq ({MIN_SEQ}..{max_seq}): "
                f"{type(e).__name__}: {_first_line(e)}; lower max_seq/max_batch or use eager attention"
            ) from e
    fwd, bwd, fspec, bspec = _Partitioner(joint, param_names).run()
    initial = tuple(named[n].detach().clone() for n in param_names)
    progs = HeadPrograms(
        forward=fwd,
        backward=bwd,
        param_names=param_names,
        initial_params=initial,
        forward_spec=fspec,
        backward_spec=bspec,
        max_batch=max_batch,
        max_seq=max_seq,
        hidden_size=d,
        example_batch=(B, T),
        vocab_size=next((m.num_embeddings for m in head.modules() if isinstance(m, torch.nn.Embedding)), 1),
        build_seconds=time.perf_counter() - t0,
    )
    log.info(
        "head programs: %d forward / %d backward nodes, %d saved tensors, %.1f s",
        len(fwd.graph.nodes), len(bwd.graph.nodes), progs.num_saved, progs.build_seconds,
    )
    return progs


def export_programs(
    programs: HeadPrograms, *, transform: Callable[[fx.GraphModule], None] | None = None, aten: bool = False
) -> tuple[ExportedProgram, ExportedProgram]:
    """Both programs as ``torch.export`` programs with dynamic ``batch``/``seq`` (for lowering).

    ``transform`` edits a copy of each GraphModule before it is traced (a runtime's preferred
    form of some ops); ``programs`` is not changed. ``aten``: traced once straight to the
    functional ATen graph that ``run_decompositions`` would make of the default (training IR)
    export, for a lowering that would otherwise trace it a second time (ONNX: ``lower_onnx``).

    Traced size-obliviously: otherwise the solver meets guards from contiguity checks on the
    backward's reshaped inputs (``seq*min(8, 8*seq) == 8*seq``) that hold for every size but
    that it cannot prove, and refuses the named dims. :func:`_check_dynamic` then verifies that
    every named dim is still symbolic with exactly its bounds.
    """
    bounds = programs.bounds()
    return (
        export_program("forward", programs.forward, programs.forward_spec, programs.example_forward_args(), bounds,
                       transform=transform, aten=aten),
        export_program("backward", programs.backward, programs.backward_spec, programs.example_backward_args(), bounds,
                       transform=transform, aten=aten),
    )


def export_program(which: str, gm: fx.GraphModule, spec: ProgramSpec, args: tuple[torch.Tensor, ...],
                   bounds: dict[str, tuple[int, int]], *,
                   transform: Callable[[fx.GraphModule], None] | None = None, aten: bool = False) -> ExportedProgram:
    """One program (``gm`` taking ``spec.inputs``) as a ``torch.export`` program whose named dims
    have exactly ``bounds``; traced at ``args``, on a copy edited by ``transform`` (see
    :func:`export_programs`, also for ``aten``). Every program this package builds is re-exported through here."""
    dims = {name: Dim(name, min=lo, max=hi) for name, (lo, hi) in bounds.items()}
    if transform is not None:
        gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        transform(gm)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    shapes = tuple({i: dims[s] for i, s in enumerate(t.shape) if isinstance(s, str)} or None for t in spec.inputs)
    try:
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):
            if aten:  # aot dispatch: functionalized, composite ops decomposed (torch.export's own run_decompositions route)
                ep = torch.export._trace._export(gm, args, dynamic_shapes=shapes, strict=False, pre_dispatch=False)
            else:
                ep = torch.export.export(gm, args, dynamic_shapes=shapes, strict=False)
    except Exception as e:
        raise ExportError(f"re-exporting the {which} program failed: {type(e).__name__}: {_first_line(e)}") from e
    _check_dynamic(ep, spec, bounds, which)
    if aten:
        _drop_identity_expands(ep)
    return ep


def _drop_identity_expands(ep: ExportedProgram) -> None:
    """Remove ``expand`` nodes whose output has their input's (symbolic) shape, as a retrace of the
    training IR does: the one-trace ``aten`` route then gives the same graph as the two-trace one."""
    graph = ep.graph_module.graph
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is _aten.expand.default:
            src = n.args[0]
            if _val(src) is None or _val(n) is None:
                continue
            a, b = _val(src).shape, _val(n).shape
            if len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b)):
                n.replace_all_uses_with(src)
                graph.erase_node(n)
    graph.lint()
    ep.graph_module.recompile()


def _check_dynamic(ep: ExportedProgram, spec: ProgramSpec, bounds: dict, which: str) -> None:
    """Every named dim of every input is still symbolic with exactly its declared bounds."""
    users = [n for n in ep.graph.nodes if n.op == "placeholder"][-len(spec.inputs):]
    for t, n in zip(spec.inputs, users):
        for s, v in zip(t.shape, _val(n).shape):
            if not isinstance(s, str):
                continue
            if not isinstance(v, torch.SymInt):
                raise ExportError(f"{which} program: {t.name} dim {s!r} was specialized to {v}; the head is not shape-generic")
            r = ep.range_constraints.get(v.node.expr)
            if r is None or (int(r.lower), int(r.upper)) != bounds[s]:
                raise ExportError(f"{which} program: {t.name} dim {s!r} has range {r}, expected {list(bounds[s])}")


_WRAPPED = "head."  # prefix of the head's names inside _SurrogateLoss


class _SurrogateLoss(torch.nn.Module):
    """``loss = Σ head(x)·G``: its gradient w.r.t. θ is the VJP of ``z`` with ``G``."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, input_ids, attention_mask, grad_z):
        z = self.head(input_ids, attention_mask)
        return (z * grad_z).sum(), z.detach()


@contextlib.contextmanager
def _training_view(head: torch.nn.Module, trainable: set[str]) -> Iterator[None]:
    flags = {n: p.requires_grad for n, p in head.named_parameters()}
    modes = {m: m.training for m in head.modules()}
    try:
        head.eval()
        for n, p in head.named_parameters():
            p.requires_grad_(n in trainable)
        yield
    finally:
        for n, p in head.named_parameters():
            p.requires_grad_(flags[n])
        for m, mode in modes.items():
            m.training = mode


def _traced_bounds(max_batch: int, max_seq: int) -> dict[str, tuple[int, int]]:
    """Bounds the programs are traced with: the user's, widened so neither dim is static.

    ``torch.export`` needs an example >= 2 and a range wider than one value to keep a dim
    symbolic; ``max_batch=1`` is traced as 1..2 (the bundle's own limits still apply at run time).
    """
    return {BATCH: (1, max(max_batch, 2)), SEQ: (MIN_SEQ, max(max_seq, MIN_SEQ + 1))}


def _check_args(named, param_names, max_batch, max_seq) -> None:
    if not param_names:
        raise ConfigError("param_names is empty; pass the head's LoRA parameter names")
    if len(set(param_names)) != len(param_names):
        raise ConfigError("param_names has duplicates; each trainable tensor must be named once")
    for n in param_names:
        if n not in named:
            raise ConfigError(f"param_names: the head has no parameter {n!r} (e.g. {next(iter(named), '-')!r})")
        if named[n].dtype != torch.float32:
            raise ConfigError(f"param_names: {n!r} is {named[n].dtype}; trainable tensors must be float32")
    if max_batch < 1 or max_seq < MIN_SEQ:
        raise ConfigError(f"max_batch must be >= 1 and max_seq >= {MIN_SEQ} (got {max_batch}, {max_seq})")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {list(x.shape)}"
    return type(x).__name__


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__


def _val(n: fx.Node):
    return n.meta.get("val")


def _is_sym(n: fx.Node) -> bool:
    return isinstance(_val(n), (torch.SymInt, int)) and n.op == "call_function"


class _Partitioner:
    """Cuts the joint graph of ``_export_forward_backward`` into two GraphModules."""

    def __init__(self, joint: ExportedProgram, param_names: tuple[str, ...]) -> None:
        self.joint = joint
        self.param_names = param_names
        self.graph = joint.graph_module.graph
        sig = joint.graph_signature
        nodes = {n.name: n for n in self.graph.nodes if n.op == "placeholder"}
        self.user = [nodes[s.arg.name] for s in sig.input_specs if s.kind == InputKind.USER_INPUT]
        self.ids, self.mask, self.gz = self.user
        by_target = {s.target: nodes[s.arg.name] for s in sig.input_specs if s.kind == InputKind.PARAMETER}
        self.params = [by_target[_WRAPPED + n] for n in param_names]
        # Frozen weights, buffers and lifted constants become attributes of the new modules.
        state = {**joint.state_dict, **joint.constants}
        self.consts = {
            nodes[s.arg.name]: state[s.target].detach().clone()
            for s in sig.input_specs
            if s.kind != InputKind.USER_INPUT and nodes[s.arg.name] not in self.params
        }
        out = list(self.graph.output_node().args[0])
        self.z = next(n for n, s in zip(out, sig.output_specs) if s.kind == OutputKind.USER_OUTPUT)
        grads = {s.target: n for n, s in zip(out, sig.output_specs) if s.kind == OutputKind.GRADIENT_TO_PARAMETER}
        missing = [n for n in param_names if _WRAPPED + n not in grads]
        if missing:
            raise ExportError(f"parameter {missing[0]!r} does not affect z (no gradient); drop it from param_names")
        self.grads = [grads[_WRAPPED + n] for n in param_names]
        self.symbols = self._symbols()

    def _symbols(self) -> dict[sympy.Symbol, tuple[str, int]]:
        """sympy symbol of each dynamic dim -> (its name, the dim of z/grad_z it sizes).

        The three inputs may keep separate symbols for the same dim when no op equates them
        (a broadcast against a possible size 1 does not); at run time they are equal.
        """
        syms = {}
        for name, i in ((BATCH, 0), (SEQ, 1)):
            for inp in (self.ids, self.mask, self.gz):
                s = _val(inp).shape[i]
                if not isinstance(s, torch.SymInt) or not isinstance(s.node.expr, sympy.Symbol):
                    raise ExportError(f"the head specialized the {name} dim to {s}; it must work for any {name} size")
                syms[s.node.expr] = (name, i)
        return syms

    # -- classification -------------------------------------------------------------------

    def run(self) -> tuple[fx.GraphModule, fx.GraphModule, ProgramSpec, ProgramSpec]:
        g = self.graph
        order = {n: i for i, n in enumerate(g.nodes)}

        # Which nodes carry data from the user inputs (not just their shapes)?
        from_input: set[fx.Node] = {self.ids, self.mask}
        from_grad: set[fx.Node] = {self.gz}
        for n in g.nodes:
            if n.op != "call_function" or _shape_only(n):
                continue
            ins = n.all_input_nodes
            if any(a in from_grad for a in ins):
                from_grad.add(n)
            elif any(a in from_input for a in ins):
                from_input.add(n)

        # Backward nodes: on a path from grad_z to a parameter gradient.
        bwd_nodes = {n for n in _ancestors(self.grads) if n in from_grad}
        # What the forward computes anyway: only these are saved. Forward-side values that only
        # the backward reads (the erf/exp of gelu's derivative, ...) are computed there, as
        # eager autograd does, so the forward -- on the critical path -- does no extra work.
        forward_needed = _ancestors([self.z])
        forward_needed |= {u for n in forward_needed if isinstance(_val(n), tuple) for u in n.users}  # all outputs of multi-output ops
        recompute: set[fx.Node] = set()  # forward-side nodes copied into the backward
        saved: set[fx.Node] = set()
        stack = [a for n in bwd_nodes if not _shape_only(n) for a in n.all_input_nodes]
        while stack:
            a = stack.pop()
            if a in bwd_nodes or a in recompute or a in saved:
                continue
            if a.op == "placeholder":
                if a in (self.ids, self.mask):
                    saved.add(a)
                continue
            if _shape_only(a):
                recompute.add(a)  # re-derived from grad_z's dims
            elif a not in from_input or a not in forward_needed or (a.target in _VIEW_OPS and a.args[0] in from_input):
                recompute.add(a)
                stack.extend(a.all_input_nodes)
            else:
                saved.add(a)
        saved_list = sorted(saved, key=order.get)
        if self.z.target is _aten.alias.default:  # the wrapper's z.detach(); output z itself
            self.z = self.z.args[0]

        fwd, fspec = self._build_forward(saved_list, order)
        bwd, bspec = self._build_backward(saved_list, bwd_nodes | recompute, order, fspec)
        return fwd, bwd, fspec, bspec

    # -- graph building ------------------------------------------------------------------

    def _canonical(self, v: torch.Tensor) -> list[int | sympy.Symbol]:
        """Shape of ``v`` with every composite symbolic dim split into int/symbol factors."""
        out: list[int | sympy.Symbol] = []
        for s in v.shape:
            expr = sympy.sympify(s.node.expr if isinstance(s, torch.SymInt) else s)
            coeff, factors = expr.as_coeff_mul()
            flat = []
            for f in factors:
                base, exp = f.as_base_exp()
                if not (base in self.symbols and exp.is_Integer and exp > 0):
                    raise ExportError(f"a saved activation has a dim {expr} that is not a product of batch and seq")
                flat += [base] * int(exp)
            if coeff != 1 or not flat:
                out.append(int(coeff))
            out += flat
        return out

    def _emit_sym(self, graph: fx.Graph, s, dims: dict) -> object:
        """An fx argument (int or node) computing the SymInt/sympy ``s`` from ``dims``."""
        if isinstance(s, int):
            return s
        expr = sympy.sympify(s.node.expr if isinstance(s, torch.SymInt) else s)
        return _emit_expr(graph, expr, lambda sym: self._dim_node(graph, sym, dims))

    def _dim_node(self, graph: fx.Graph, sym: sympy.Symbol, dims: dict) -> fx.Node:
        if sym not in self.symbols:
            raise ExportError(f"the graph uses a size {sym} that is neither batch nor seq; the head is data-dependent")
        name, i = self.symbols[sym]
        if name not in dims:
            dims[name] = graph.call_function(_aten.sym_size.int, (dims["src"], i))
        return dims[name]

    def _copy(self, graph: fx.Graph, nodes: list[fx.Node], env: dict, dims: dict, consts: dict) -> None:
        """Copy ``nodes`` (in order) into ``graph``; shapes are re-derived from ``dims["src"]``."""

        def arg(a: fx.Node):
            if a in env:
                return env[a]
            if a in self.consts:
                if a not in consts:
                    consts[a] = graph.get_attr(f"_c{len(consts)}")
                    consts[a].meta["val"] = _val(a)
                return consts[a]
            raise ExportError(f"internal: node {a.name} is used before it is defined while splitting the graph")

        for n in nodes:
            if _is_sym(n):
                env[n] = self._emit_sym(graph, _val(n), dims)
            elif n.target in _LIKE_OPS:
                v = _val(n)
                fill = n.args[1] if _LIKE_OPS[n.target] is None else _LIKE_OPS[n.target]
                shape = [self._emit_sym(graph, s, dims) for s in v.shape]
                kw = {"dtype": v.dtype, "device": v.device, "pin_memory": False}
                env[n] = graph.call_function(_aten.full.default, (shape, fill), kw)
            else:
                env[n] = graph.node_copy(n, arg)
            if isinstance(env[n], fx.Node):
                env[n].meta = dict(n.meta)

    def _module(self, graph: fx.Graph, consts: dict) -> fx.GraphModule:
        root = torch.nn.Module()
        for node, attr in consts.items():
            root.register_buffer(attr.target, self.consts[node])  # shared by both programs
        graph.eliminate_dead_code()
        gm = fx.GraphModule(root, graph)
        gm.graph.lint()
        return gm

    def _param_specs(self) -> list[TensorSpec]:
        return [TensorSpec(n, "float32", tuple(_val(p).shape)) for n, p in zip(self.param_names, self.params)]

    def _placeholders(self, graph: fx.Graph, env: dict) -> None:
        for name, p in zip(self.param_names, self.params):
            env[p] = graph.placeholder(_safe(name))
            env[p].meta = dict(p.meta)

    def _build_forward(self, saved: list[fx.Node], order: dict) -> tuple[fx.GraphModule, ProgramSpec]:
        g = fx.Graph()
        env: dict = {}
        for name, ph in (("input_ids", self.ids), ("attention_mask", self.mask)):
            env[ph] = g.placeholder(name)
            env[ph].meta = dict(ph.meta)
        self._placeholders(g, env)
        dims = {"src": env[self.ids]}
        consts: dict = {}
        body = sorted(_ancestors([self.z, *saved]) - set(env), key=order.get)
        self._copy(g, [n for n in body if n.op != "placeholder"], env, dims, consts)
        outs = [env[self.z]]
        out_specs = [TensorSpec("z", "float32", (BATCH, SEQ, _val(self.z).shape[2]))]
        for i, s in enumerate(saved):
            canon = self._canonical(_val(s))
            out = env[s]
            if _is_split(canon, _val(s)):
                out = g.call_function(_aten.reshape.default, (out, [self._emit_sym(g, c, dims) for c in canon]))
            outs.append(out)
            shape = tuple(c if isinstance(c, int) else self.symbols[c][0] for c in canon)
            out_specs.append(TensorSpec(f"saved_{i}", _dtype_name(_val(s).dtype), shape))
        g.output(tuple(outs))
        in_specs = (
            TensorSpec("input_ids", "int64", (BATCH, SEQ)),
            TensorSpec("attention_mask", "int64", (BATCH, SEQ)),
            *self._param_specs(),
        )
        return self._module(g, consts), ProgramSpec(in_specs, tuple(out_specs))

    def _build_backward(self, saved: list[fx.Node], nodes: set[fx.Node], order: dict, fspec: ProgramSpec):
        g = fx.Graph()
        env: dict = {}
        inputs = [g.placeholder(f"saved_{i}") for i in range(len(saved))]
        env[self.gz] = g.placeholder("grad_z")
        env[self.gz].meta = dict(self.gz.meta)
        self._placeholders(g, env)
        dims = {"src": env[self.gz]}
        for s, ph in zip(saved, inputs):
            ph.meta = dict(s.meta)
            env[s] = ph
            if _is_split(self._canonical(_val(s)), _val(s)):
                env[s] = g.call_function(_aten.view.default, (ph, [self._emit_sym(g, d, dims) for d in _val(s).shape]))
        consts: dict = {}
        body = sorted((n for n in nodes if n not in env and n.op != "placeholder"), key=order.get)
        self._copy(g, body, env, dims, consts)
        g.output(tuple(env[n] for n in self.grads))
        in_specs = (*fspec.outputs[1:], TensorSpec("grad_z", "float32", fspec.outputs[0].shape), *self._param_specs())
        out_specs = tuple(TensorSpec(f"grad.{n}", "float32", tuple(_val(p).shape)) for n, p in zip(self.param_names, self.params))
        return self._module(g, consts), ProgramSpec(in_specs, out_specs)


def _shape_only(n: fx.Node) -> bool:
    """Nodes that read only shapes: recomputed wherever needed, never saved."""
    return n.op == "call_function" and (_is_sym(n) or n.target in _LIKE_OPS)


def _is_split(canon: list, v: torch.Tensor) -> bool:
    """Whether a saved tensor travels reshaped to ``canon`` (it has a composite dim)."""
    own = [s if isinstance(s, int) else sympy.sympify(s.node.expr) for s in v.shape]
    return own != canon


def _emit_expr(graph: fx.Graph, expr: sympy.Expr, leaf) -> object:
    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        return leaf(expr)
    if expr.is_Mul or expr.is_Add:
        op = operator.mul if expr.is_Mul else operator.add
        parts = [_emit_expr(graph, a, leaf) for a in expr.args]
        acc = parts[0]
        for p in parts[1:]:
            acc = graph.call_function(op, (acc, p))
        return acc
    if expr.is_Pow and expr.exp.is_Integer and expr.exp > 0:
        base = _emit_expr(graph, expr.base, leaf)
        acc = base
        for _ in range(int(expr.exp) - 1):
            acc = graph.call_function(operator.mul, (acc, base))
        return acc
    if type(expr).__name__ == "FloorDiv":
        a, b = (_emit_expr(graph, x, leaf) for x in expr.args)
        return graph.call_function(operator.floordiv, (a, b))
    raise ExportError(f"a shape in the graph is {expr}, which the split programs cannot re-derive from batch/seq")


def _ancestors(roots) -> set[fx.Node]:
    """``roots`` and every node they read, not looking past shape-only nodes."""
    seen: set[fx.Node] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if not _shape_only(n):
            stack.extend(n.all_input_nodes)
    return seen


def _safe(name: str) -> str:
    return "p_" + "".join(c if c.isalnum() else "_" for c in name)


_DTYPE_NAMES = {torch.float32: "float32", torch.int64: "int64", torch.bool: "bool", torch.int32: "int32",
                torch.float16: "float16", torch.bfloat16: "bfloat16", torch.uint8: "uint8", torch.int8: "int8"}


def _dtype_name(dt: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dt]
    except KeyError:
        raise ExportError(f"a saved activation has dtype {dt}, which bundles cannot describe") from None


def with_canonical_names(spec: ProgramSpec, canonical: dict[str, str], *, what: str) -> ProgramSpec:
    """``spec`` with its parameter inputs named by their canonical (PEFT) names and its gradient
    outputs ``grad.<canonical name>``: the names the lowered graphs and the manifest use.

    Only names change (positions, dtypes and shapes stay), so a traced graph is untouched. Two
    tensors that would share a name are an ExportError naming the program (``what``).
    """

    def fix(ts: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        out = []
        for t in ts:
            name = canonical.get(t.name)
            if name is None and t.name.startswith("grad.") and t.name[5:] in canonical:
                name = "grad." + canonical[t.name[5:]]
            out.append(dataclasses.replace(t, name=name or t.name))
        return tuple(out)

    renamed = ProgramSpec(fix(spec.inputs), fix(spec.outputs))
    names = [t.name for t in (*renamed.inputs, *renamed.outputs)]
    if len(set(names)) != len(names):
        raise ExportError(f"two tensors of the {what} program share a name after renaming to PEFT names; please report this")
    return renamed
