"""Head then tail equals the full model, for every family, at splits {1, L/2, L-1}."""

import pytest
import torch
from peft import get_peft_model_state_dict

from flexsfl.core.errors import ConfigError
from flexsfl.model.loading import load_model
from flexsfl.model.partition import block_of, build_head, build_tail, canonical_names, task_loss


def _perturb(lm):
    # LoRA B starts at zero and the adapters would be a no-op: move every trainable tensor so the
    # test sees the adapters (and the task head) take part in the computation.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _batch(pad_id, vocab=30522, b=3, t=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, min(vocab, 5000), (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = pad_id
    return ids, mask


def _check(lm):
    _perturb(lm)
    L = lm.info.num_blocks
    ids, mask = _batch(lm.model.config.pad_token_id or 0, lm.info.vocab_size)
    with torch.no_grad():
        full = lm.model(input_ids=ids, attention_mask=mask).logits
        for s in sorted({1, L // 2, L - 1}):
            z = build_head(lm, s)(ids, mask)
            assert z.shape == (3, 12, lm.info.hidden_size)
            out = build_tail(lm, s)(z, mask)
            assert out.shape == full.shape
            assert (out - full).abs().max().item() <= 1e-5, f"split {s}"


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm", num_labels=3)


def test_bert_minilm_head_tail_equals_full(minilm):
    _check(minilm)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("task", ["seq_cls", "causal_lm"])
def test_decoder_head_tail_equals_full(tiny_model_dirs, family, task):
    _check(load_model(str(tiny_model_dirs[family]), task=task, num_labels=4))


@pytest.mark.slow
def test_smollm2_head_tail_equals_full():
    _check(load_model("smollm2", num_labels=4))


@pytest.mark.parametrize("split", [1, 5])
def test_bert_tail_computing_only_the_cls_row_of_its_last_block_changes_no_gradient(minilm, split):
    # The server's BERT tail runs the last block for position 0 alone (the pooler reads nothing
    # else); Z's gradient -- what the device trains on -- and every tail gradient must not change.
    _perturb(minilm)
    tail = build_tail(minilm, split)
    ids, mask = _batch(0)
    with torch.no_grad():
        z0 = build_head(minilm, split)(ids, mask)
    labels = torch.tensor([0, 2, 1])
    got = {}
    for cls_only in (True, False):
        tail.cls_only_last_block = cls_only
        z = z0.clone().requires_grad_(True)
        loss = task_loss(tail(z, mask), labels, "seq_cls")
        got[cls_only] = (loss.detach(), *torch.autograd.grad(loss, [z] + [p for _, p in tail.trainable()]))
    for fast, whole in zip(got[True], got[False]):
        assert torch.linalg.norm(fast - whole) <= 1e-5 * torch.linalg.norm(whole) + 1e-12
    assert torch.count_nonzero(got[True][1][1, 7:]) == 0  # padding positions get no gradient, as before


def test_head_and_tail_partition_the_trainable_tensors(minilm):
    names = canonical_names(minilm.model)
    assert set(names.values()) == set(get_peft_model_state_dict(minilm.model))
    L = minilm.info.num_blocks
    for s in (1, 3, 5):
        head, tail = build_head(minilm, s), build_tail(minilm, s)
        h, t = set(head.canonical().values()), set(tail.canonical().values())
        assert not h & t and h | t == set(names.values())
        assert all(block_of(n, L) < s for n in h)
        assert all(block_of(n, L) >= s for n in t)
        # the head holds no weights of the tail's blocks (nothing beyond what the device runs)
        assert all(".layer." not in n or int(n.split(".layer.")[1].split(".")[0]) < s for n, _ in head.named_parameters())


def test_split_out_of_range_is_a_clear_error(minilm):
    for s in (0, 6, -1):
        with pytest.raises(ConfigError, match=r"split .* out of range .* 1\.\.5"):
            build_head(minilm, s)


def test_causal_lm_loss_shifts_and_ignores_padding():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 0, 1]])
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(task_loss(logits, labels, "causal_lm"), want)


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="neither a packaged model"):
        load_model(str(tmp_path / "nope"))
