"""The U-shaped parts: head -> middle -> top equals the full model, and the top's loss is the task loss."""

import pytest
import torch

from flexsfl.core.errors import ConfigError
from flexsfl.model.loading import load_model
from flexsfl.model.partition import block_of, build_head, build_middle, build_tail, build_top, task_loss
from tests.model.test_partition import _batch, _perturb


def _check_u(lm):
    _perturb(lm)
    L = lm.info.num_blocks
    ids, mask = _batch(lm.model.config.pad_token_id or 0, lm.info.vocab_size)
    with torch.no_grad():
        full = lm.model(input_ids=ids, attention_mask=mask).logits
        for s, u in sorted({(1, 0), (1, L - 2), (L // 2, 1), (L - 1, 0)}):
            z = build_head(lm, s)(ids, mask)
            h = build_middle(lm, s, u)(z, mask)
            assert h.shape == z.shape
            out = build_top(lm, u)(h, mask)
            assert out.shape == full.shape
            assert (out - full).abs().max().item() <= 1e-5, f"split {s} top {u}"


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm", num_labels=3)


def test_bert_head_middle_top_equals_full(minilm):
    _check_u(minilm)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("task", ["seq_cls", "causal_lm"])
def test_decoder_head_middle_top_equals_full(tiny_model_dirs, family, task):
    _check_u(load_model(str(tiny_model_dirs[family]), task=task, num_labels=4))


def test_top_owns_exactly_its_blocks_and_the_task_head(minilm):
    L = minilm.info.num_blocks
    for u in (0, 2):
        blocks = {block_of(c, L) for c in build_top(minilm, u).canonical().values()}
        assert blocks == set(range(L - u, L)) | {L}  # L: the classifier
        middle = {block_of(c, L) for c in build_middle(minilm, 1, u).canonical().values()}
        assert middle == set(range(1, L - u))


@pytest.mark.parametrize("u", [0, 1, 3])
def test_bert_top_cls_only_last_block_changes_no_gradient(minilm, u):
    _perturb(minilm)
    top = build_top(minilm, u)
    ids, mask = _batch(0)
    with torch.no_grad():
        h0 = build_middle(minilm, 1, u)(build_head(minilm, 1)(ids, mask), mask)
    labels = torch.tensor([0, 2, 1])
    got = {}
    for cls_only in (True, False):
        top.cls_only_last_block = cls_only
        h = h0.clone().requires_grad_(True)
        loss = top.loss(top(h, mask), labels)
        assert loss.item() == pytest.approx(task_loss(top(h, mask), labels, "seq_cls").item())
        params = [p for _, p in top.trainable()]
        got[cls_only] = torch.autograd.grad(loss, [h, *params])
    for a, b in zip(got[True], got[False]):
        # fp32 through two summation orders: 1.1e-5 seen on an AVX-512 EPYC (1e-5 on others); a wrong
        # cls-only path differs by O(1)
        assert float((a - b).norm() / b.norm().clamp_min(1e-30)) <= 1e-4


def test_top_and_middle_bounds_are_one_line_errors(minilm):
    L = minilm.info.num_blocks
    with pytest.raises(ConfigError, match="at least one block"):
        build_middle(minilm, 3, L - 3)
    with pytest.raises(ConfigError, match="at least one block"):
        build_top(minilm, -1)
    with pytest.raises(ConfigError, match="out of range"):
        build_middle(minilm, 0, 1)
    assert len(build_middle(minilm, L - 1, 0).blocks) == 1 and len(build_tail(minilm, L - 1).blocks) == 1
