"""The forward/backward split of a LoRA head, checked against eager autograd.

Heads come from the real partitioner (flexsfl.model.partition) over real MiniLM weights and small random
GPT-2 / Llama models (tests/tiny_models.py). What must hold for every head and split:

- the programs reproduce ``z`` and ``torch.autograd.grad(z, θ, G)`` at any batch/seq in bounds,
  padding included;
- the forward does exactly the eager forward's FLOPs and the backward exactly the eager backward's
  (no recomputed forward), and the saved activations take no more memory than eager autograd's;
- both programs re-export with symbolic ``batch``/``seq`` and the declared bounds.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flexsfl.core.errors import ConfigError, ExportError
from flexsfl.model.loading import load_model
from flexsfl.model.partition import build_head
from flexsfl.export.programs import BATCH, SEQ, build_head_programs, export_programs

MAX_B, MAX_T = 4, 32
CASES = [
    ("minilm", 1),
    pytest.param(("minilm", 3), marks=pytest.mark.slow),
    ("gpt2", 1),
    ("gpt2", 2),
    ("llama", 1),
    ("llama", 2),
]
SHAPES = [(1, 2), (2, 9), (3, 17), (MAX_B, MAX_T)]

_cache: dict = {}


@pytest.fixture
def built(request, tiny_model_dirs):
    """(head with random non-zero LoRA, param names, programs) for (family, split), built once."""
    family, split = request.param
    if (family, split) not in _cache:
        loaded = load_model("minilm" if family == "minilm" else str(tiny_model_dirs[family]))
        head = build_head(loaded, split)
        _randomize_lora(head)
        names = [n for n, _ in head.trainable()]
        _cache[family, split] = head, names, build_head_programs(head, names, max_batch=MAX_B, max_seq=MAX_T)
    return _cache[family, split]


def _randomize_lora(head: torch.nn.Module) -> None:
    # PEFT starts lora_B at zero, which makes every lora_A gradient zero: test with both non-zero.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in head.trainable():
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def _batch(b: int, t: int, seed: int, vocab: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=gen)
    mask = torch.ones(b, t, dtype=torch.int64)
    mask[-1, max(1, t // 2):] = 0  # the last row is padded
    if b > 2:
        mask[0, t - 1:] = 0
    return ids, mask


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _eager(head, names, ids, mask, grad_z):
    params = dict(head.named_parameters())
    leaves = [params[n] for n in names]
    z = head(ids, mask)
    return z.detach(), torch.autograd.grad(z, leaves, grad_outputs=grad_z)


@pytest.mark.parametrize("built", CASES, indirect=True, ids=lambda c: f"{c[0]}-s{c[1]}")
def test_programs_match_autograd_at_any_shape(built):
    head, names, progs = built
    theta = [dict(head.named_parameters())[n].detach().clone() for n in names]
    nonzero = set()
    for i, (b, t) in enumerate(SHAPES):
        ids, mask = _batch(b, t, seed=i)
        with torch.no_grad():
            z, *saved = progs.forward(ids, mask, *theta)
        grad_z = torch.randn(z.shape, generator=torch.Generator().manual_seed(100 + i))
        z_ref, g_ref = _eager(head, names, ids, mask, grad_z)
        with torch.no_grad():
            grads = progs.backward(*saved, grad_z, *theta)
        assert _rel(z, z_ref) <= 1e-5, (b, t)
        assert len(grads) == len(names)
        for n, g, r in zip(names, grads, g_ref):
            assert _rel(g, r) <= 1e-4 or (r.abs().max() == 0 and g.abs().max() <= 1e-12), (n, b, t, _rel(g, r))
            if r.abs().max() > 0:
                nonzero.add(n)
    # A real check, not 0 == 0 (with one visible token per row, attention's query gradient is 0).
    assert nonzero == set(names)


@pytest.mark.parametrize("built", CASES, indirect=True, ids=lambda c: f"{c[0]}-s{c[1]}")
def test_one_forward_one_backward_and_less_memory_than_eager(built):
    head, names, progs = built
    params = dict(head.named_parameters())
    leaves = [params[n] for n in names]
    weights = {p.untyped_storage().data_ptr() for p in head.parameters()} | {
        b.untyped_storage().data_ptr() for b in head.buffers()
    }
    ids, mask = _batch(MAX_B, MAX_T, seed=0)
    saved_by_eager: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved_by_eager[ptr] = t.untyped_storage().nbytes()
        return t

    with FlopCounterMode(display=False) as fc, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z = head(ids, mask)
    eager_fwd = fc.get_total_flops()
    grad_z = torch.randn(z.shape)
    with FlopCounterMode(display=False) as fc:
        torch.autograd.grad(z, leaves, grad_outputs=grad_z)
    eager_bwd = fc.get_total_flops()

    theta = [p.detach() for p in leaves]
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        _, *saved = progs.forward(ids, mask, *theta)
    ours_fwd = fc.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        progs.backward(*saved, grad_z, *theta)
    ours_bwd = fc.get_total_flops()
    assert eager_fwd > 0 and ours_fwd == eager_fwd
    assert ours_bwd == eager_bwd
    ours_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert 0 < ours_bytes <= sum(saved_by_eager.values())


@pytest.mark.parametrize("built", [("gpt2", 1), ("llama", 1)], indirect=True, ids=["gpt2", "llama"])
def test_specs_describe_the_programs(built):
    head, names, progs = built
    d = progs.hidden_size
    f_in, f_out = progs.forward_spec.inputs, progs.forward_spec.outputs
    b_in, b_out = progs.backward_spec.inputs, progs.backward_spec.outputs
    params = dict(head.named_parameters())
    assert [t.name for t in f_in] == ["input_ids", "attention_mask", *names]
    assert [(t.dtype, t.shape) for t in f_in[:2]] == [("int64", (BATCH, SEQ))] * 2
    assert [t.shape for t in f_in[2:]] == [tuple(params[n].shape) for n in names]
    assert (f_out[0].name, f_out[0].shape) == ("z", (BATCH, SEQ, d))
    assert progs.num_saved == len(f_out) - 1 > 0
    for t in f_out[1:]:  # only plain dims: what torch.export and ExecuTorch's planner can bound
        assert all(isinstance(s, int) or s in (BATCH, SEQ) for s in t.shape), t
    assert b_in == (*f_out[1:], f_out[0].__class__("grad_z", "float32", (BATCH, SEQ, d)), *f_in[2:])
    assert [t.shape for t in b_out] == [tuple(params[n].shape) for n in names]

    ids, mask = _batch(3, 11, seed=1)
    with torch.no_grad():
        outs = progs.forward(ids, mask, *progs.initial_params)
    dims = {BATCH: 3, SEQ: 11}
    for spec, out in zip(f_out, outs):
        assert tuple(out.shape) == tuple(dims.get(s, s) for s in spec.shape), spec.name
        assert str(out.dtype) == f"torch.{spec.dtype}"


@pytest.mark.parametrize("built", [("gpt2", 1)], indirect=True, ids=["gpt2"])
def test_reexport_keeps_dynamic_batch_and_seq(built):
    head, names, progs = built
    ep_f, ep_b = export_programs(progs)
    for ep in (ep_f, ep_b):
        bounds = sorted((int(r.lower), int(r.upper)) for r in ep.range_constraints.values())
        assert bounds == [(1, MAX_B), (2, MAX_T)]
    # The exported programs run at other shapes than the example and agree with the graphs.
    ids, mask = _batch(MAX_B, 7, seed=3)
    theta = progs.initial_params
    z, *saved = ep_f.module()(ids, mask, *theta)
    with torch.no_grad():
        z_ref, *saved_ref = progs.forward(ids, mask, *theta)
    assert _rel(z, z_ref) <= 1e-6
    grad_z = torch.randn(z.shape)
    grads = ep_b.module()(*saved, grad_z, *theta)
    with torch.no_grad():
        want = progs.backward(*saved_ref, grad_z, *theta)
    assert all(_rel(g, w) <= 1e-6 for g, w in zip(grads, want))


@pytest.mark.parametrize("built", [("gpt2", 1)], indirect=True, ids=["gpt2"])
def test_building_leaves_the_head_as_it_was(built, tiny_model_dirs):
    head, names, _ = built
    head.train()  # a caller's mode and flags, whatever they are, come back unchanged
    frozen = next(p for n, p in head.named_parameters() if n not in names)
    frozen.requires_grad_(True)
    flags = {n: p.requires_grad for n, p in head.named_parameters()}
    modes = {n: m.training for n, m in head.named_modules()}
    build_head_programs(head, names[:1], max_batch=2, max_seq=8)
    assert flags == {n: p.requires_grad for n, p in head.named_parameters()}
    assert modes == {n: m.training for n, m in head.named_modules()}
    frozen.requires_grad_(False)
    head.eval()


class _Unused(torch.nn.Module):
    """A head with a trainable tensor that z does not depend on."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.unused = torch.nn.Parameter(torch.ones(3))

    def forward(self, input_ids, attention_mask):
        return self.proj(self.emb(input_ids)) * attention_mask[..., None]


@pytest.mark.parametrize(
    "names,kw,error,match",
    [
        ([], {}, ConfigError, "param_names is empty"),
        (["nope"], {}, ConfigError, "has no parameter 'nope'"),
        (["proj.weight", "proj.weight"], {}, ConfigError, "duplicates"),
        (["proj.weight"], {"max_seq": 1}, ConfigError, "max_seq >= 2"),
        (["proj.weight"], {"example_batch": (9, 4)}, ConfigError, "example_batch"),
        (["unused"], {}, ExportError, "'unused' does not affect z"),
    ],
)
def test_bad_arguments_are_refused(names, kw, error, match):
    with pytest.raises(error, match=match):
        build_head_programs(_Unused(), names, **{"max_batch": 4, "max_seq": 8, **kw})


def test_a_head_must_return_z():
    class Pooled(_Unused):
        def forward(self, input_ids, attention_mask):
            return super().forward(input_ids, attention_mask).mean(1)

    with pytest.raises(ExportError, match=r"head must return z float32 \[B,T,d\]"):
        build_head_programs(Pooled(), ["proj.weight"], max_batch=4, max_seq=8)


@pytest.mark.parametrize("max_batch,max_seq,b,t", [(4, 8, 3, 5), (1, 2, 1, 2)])
def test_a_small_custom_head_splits_too(max_batch, max_seq, b, t):
    """Any module with the head contract works, down to batch 1 and 2 tokens at most."""
    head, names = _Unused(), ["proj.weight", "proj.bias"]
    progs = build_head_programs(head, names, max_batch=max_batch, max_seq=max_seq)
    ids, mask = _batch(b, t, seed=0, vocab=50)
    grad_z = torch.randn(b, t, 8)
    z_ref, g_ref = _eager(head, names, ids, mask, grad_z)
    with torch.no_grad():
        z, *saved = progs.forward(ids, mask, *progs.initial_params)
        grads = progs.backward(*saved, grad_z, *progs.initial_params)
    assert _rel(z, z_ref) <= 1e-6 and all(_rel(g, r) <= 1e-6 for g, r in zip(grads, g_ref))
    ep_f, _ = export_programs(progs)  # and they export with those bounds
    assert _rel(ep_f.module()(ids, mask, *progs.initial_params)[0], z_ref) <= 1e-6
