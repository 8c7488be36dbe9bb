"""Cut a LoRA-adapted Hugging Face model into parts: head, tail, and for the U-shaped topology middle and top.

Model: embeddings ``E``, blocks ``B_0..B_{L-1}``, final norm + task head ``H``. The head is
``E, B_0..B_{s-1}`` and maps ``(input_ids, attention_mask)`` to the smashed data ``Z`` [B, T, d];
the tail is ``B_s..B_{L-1}, H`` and maps ``(Z, attention_mask)`` to logits. ``tail(head(x))``
equals the full model's logits (tested to 1e-5 in fp32).

U-shaped topology (labels stay on the device): with ``u >= 0`` top blocks, the server's
*middle* is ``B_s..B_{L-u-1}`` (``(Z, mask) -> H`` [B, T, d]) and the device's *top* is
``B_{L-u}..B_{L-1}, H`` (``(H, mask) -> logits``, with the loss); ``top(middle(Z))`` equals
``tail(Z)``. ``u = 0`` leaves the top only the final norm and the task head, so the loss and the
labels still never leave the device.

Heads and tails *reference* the modules of one shared model, never copy them: the server builds
a tail per split point over its single global model, and export lowers a head built over the
model it loaded. Masks are built here with plain tensor ops (additive, ``finfo.min`` where a key
is hidden, like Hugging Face's eager masks) so the head exports to ExecuTorch and ONNX with
dynamic batch and sequence length.

Parameter names: every trainable tensor has a *canonical name*, its key in PEFT's
``adapter_model.safetensors`` (``base_model.model.bert.encoder.layer.0.attention.self.query.
lora_A.weight``); the wire, aggregation and bundles all use it. :func:`block_of` maps it to its
0-based block (the task head belongs to "block" ``L``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from flexsfl.core.errors import ConfigError

if TYPE_CHECKING:
    from flexsfl.model.loading import LoadedModel

__all__ = [
    "Head",
    "Tail",
    "Middle",
    "Top",
    "build_head",
    "build_tail",
    "build_middle",
    "build_top",
    "canonical_names",
    "block_of",
    "task_loss",
    "padding_mask",
    "causal_padding_mask",
]

_BLOCK_RE = re.compile(r"\.(?:layer|h|layers)\.(\d+)\.")


def block_of(name: str, num_blocks: int) -> int:
    """0-based block of a canonical parameter name; ``num_blocks`` for the task head."""
    m = _BLOCK_RE.search(name)
    return int(m.group(1)) if m else num_blocks


def canonical_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> canonical name`` for every trainable parameter of a PEFT model.

    PEFT saves ``...lora_A.default.weight`` as ``...lora_A.weight`` and
    ``classifier.modules_to_save.default.weight`` as ``classifier.weight``; we do the same so
    our names are exactly the keys of ``adapter_model.safetensors``.
    """
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[id(p)] = name.replace(".modules_to_save.default", "").replace(".default", "")
    return out


def padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] 0/1 -> additive [B, 1, 1, T]: keys that are padding get ``finfo.min``."""
    hidden = attention_mask[:, None, None, :] == 0
    return torch.zeros(hidden.shape, dtype=dtype, device=attention_mask.device).masked_fill(hidden, torch.finfo(dtype).min)


def causal_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] 0/1 -> additive [B, 1, T, T]: a query sees keys at or before it that are not padding."""
    t = attention_mask.shape[1]
    pos = torch.arange(t, device=attention_mask.device)
    future = pos[None, :] > pos[:, None]  # [T, T], True where key j > query i
    hidden = future[None, None, :, :] | (attention_mask[:, None, None, :] == 0)
    return torch.zeros(hidden.shape, dtype=dtype, device=attention_mask.device).masked_fill(hidden, torch.finfo(dtype).min)


class _Part(nn.Module):
    """What heads and tails share: the family, the blocks they own and how to run one."""

    def __init__(self, loaded: "LoadedModel", blocks: range) -> None:
        super().__init__()
        self.family = loaded.family
        self.num_blocks = loaded.info.num_blocks
        self.hidden_size = loaded.info.hidden_size
        base = loaded.base
        if self.family == "bert":
            body, layers = base.bert, base.bert.encoder.layer
        elif self.family == "gpt2":
            body, layers = base.transformer, base.transformer.h
        else:
            body, layers = base.model, base.model.layers
        # Kept out of the module tree: only the parts a head/tail owns may show up in its parameters.
        object.__setattr__(self, "_body", body)
        self.block_ids = blocks
        self.blocks = nn.ModuleList([layers[i] for i in blocks])
        self._names = canonical_names(loaded.model)

    def _mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.family == "bert":
            return padding_mask(attention_mask, dtype)
        return causal_padding_mask(attention_mask, dtype)

    def _run_blocks(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = self._mask(attention_mask, h.dtype)
        if self.family == "llama":
            pos = torch.arange(h.shape[1], device=h.device)[None, :]
            rope = self.rotary_emb(h, position_ids=pos)
            for blk in self.blocks:
                h = blk(h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
        else:
            for blk in self.blocks:
                h = blk(h, attention_mask=mask)
        return h

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """``(own parameter name, parameter)`` of this part's trainable tensors, in module order."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def canonical(self) -> dict[str, str]:
        """Own parameter name -> canonical (PEFT adapter file) name, for trainable tensors."""
        return {n: self._names[id(p)] for n, p in self.trainable()}


class Head(_Part):
    """Embeddings + blocks ``0..s-1``: ``forward(input_ids [B,T] int64, attention_mask [B,T] int64) -> Z [B,T,d]``."""

    def __init__(self, loaded: "LoadedModel", split: int) -> None:
        super().__init__(loaded, range(split))
        body = self._body
        if self.family == "bert":
            self.embeddings = body.embeddings
        elif self.family == "gpt2":
            self.wte, self.wpe = body.wte, body.wpe
        else:
            self.embed_tokens = body.embed_tokens
            self.rotary_emb = body.rotary_emb

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.family == "bert":
            h = self.embeddings(input_ids=input_ids)
        elif self.family == "gpt2":
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
            h = self.wte(input_ids) + self.wpe(pos)
        else:
            h = self.embed_tokens(input_ids)
        return self._run_blocks(h, attention_mask)


class Tail(_Part):
    """Blocks ``s..L-1`` + final norm + task head: ``forward(z [B,T,d], attention_mask [B,T]) -> logits``.

    Logits are [B, C] for sequence classification (BERT: pooled [CLS]; decoders: the last
    non-padding token) and [B, T, V] for causal LM.
    """

    def __init__(self, loaded: "LoadedModel", split: int) -> None:
        super().__init__(loaded, range(split, loaded.info.num_blocks))
        self._output_layers(loaded)

    def _output_layers(self, loaded: "LoadedModel") -> None:
        self.task = loaded.info.task
        base = loaded.base
        if self.family == "bert":
            self.pooler = base.bert.pooler
            self.norm = None
        elif self.family == "gpt2":
            self.norm = base.transformer.ln_f
        else:
            self.norm = base.model.norm
            self.rotary_emb = base.model.rotary_emb
        self.out = base.classifier if self.family == "bert" else (base.score if self.task == "seq_cls" else base.lm_head)
        self.cls_only_last_block = True  # BERT classification: see forward (False runs the block whole)

    def forward(self, z: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.family == "bert" and self.task == "seq_cls" and self.cls_only_last_block and len(self.blocks):
            # The pooler reads position 0 only, so the last block needs every position's keys and
            # values but the queries, attention output and MLP of position 0 alone: the same
            # logits and gradients for a fraction of the last block's FLOPs (about 1/6 of it).
            *rest, last = self.blocks
            mask = self._mask(attention_mask, z.dtype)
            h = z
            for blk in rest:
                h = blk(h, attention_mask=mask)
            return self.out(self.pooler(_bert_block_first_row(last, h, mask)))
        h = self._run_blocks(z, attention_mask)
        if self.family == "bert":
            return self.out(self.pooler(h))
        logits = self.out(self.norm(h))
        if self.task == "causal_lm":
            return logits
        # The last position whose mask is 1 (works for right and left padding alike). ArgMax over
        # float: ONNX Runtime has no int64 ArgMax (a decoder's exported top needs this), and
        # positions are exact in float32.
        pos = torch.arange(h.shape[1], device=h.device)
        last = (pos[None, :] * attention_mask).float().argmax(-1)
        return logits[torch.arange(h.shape[0], device=h.device), last]


class Middle(_Part):
    """Blocks ``s..L-u-1``, the server's part in the U-shaped topology.

    ``forward(z [B,T,d], attention_mask [B,T] int64) -> h [B,T,d]``: every position (the device's
    top needs them all: keys and values of its blocks, or the causal LM's logits).
    """

    def __init__(self, loaded: "LoadedModel", split: int, top: int) -> None:
        super().__init__(loaded, range(split, loaded.info.num_blocks - top))
        if self.family == "llama":
            self.rotary_emb = loaded.base.model.rotary_emb

    def forward(self, z: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._run_blocks(z, attention_mask)


class Top(Tail):
    """The device's top in the U-shaped topology: blocks ``L-u..L-1`` + final norm + task head.

    ``forward(h [B,T,d], attention_mask [B,T]) -> logits`` exactly as :class:`Tail` (BERT
    classification runs the last block for the [CLS] position only); :meth:`loss` is the task
    loss, so a device holding the top computes it with its own labels. ``u = 0`` holds no block.
    """

    def __init__(self, loaded: "LoadedModel", top: int) -> None:
        _Part.__init__(self, loaded, range(loaded.info.num_blocks - top, loaded.info.num_blocks))
        self._output_layers(loaded)
        self.top = top

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return task_loss(logits, labels, self.task)


def _bert_block_first_row(blk: nn.Module, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A BERT layer's output at position 0 only, [B, 1, d], given every position's input ``h``.

    Calls the layer's own (possibly LoRA-wrapped) submodules and the model's configured attention
    function, so the numbers are those of ``blk(h)[:, :1]``.
    """
    from transformers.models.bert.modeling_bert import ALL_ATTENTION_FUNCTIONS, eager_attention_forward

    sa = blk.attention.self
    b, t, _ = h.shape
    heads, size = sa.num_attention_heads, sa.attention_head_size
    first = h[:, :1]
    q = sa.query(first).view(b, 1, heads, size).transpose(1, 2)
    k = sa.key(h).view(b, t, heads, size).transpose(1, 2)
    v = sa.value(h).view(b, t, heads, size).transpose(1, 2)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(sa.config._attn_implementation, eager_attention_forward)
    ctx, _ = attend(sa, q, k, v, mask, dropout=sa.dropout.p if sa.training else 0.0, scaling=sa.scaling)
    a = blk.attention.output(ctx.reshape(b, 1, heads * size), first)
    return blk.output(blk.intermediate(a), a)


def _check_split(loaded: "LoadedModel", split: int) -> None:
    L = loaded.info.num_blocks
    if not 1 <= split < L:
        raise ConfigError(f"split {split} is out of range for {loaded.info.id}: choose 1..{L - 1} ({L} blocks)")


def build_head(loaded: "LoadedModel", split: int) -> Head:
    _check_split(loaded, split)
    return Head(loaded, split).eval()


def build_tail(loaded: "LoadedModel", split: int) -> Tail:
    _check_split(loaded, split)
    return Tail(loaded, split).eval()


def _check_top(loaded: "LoadedModel", split: int, top: int) -> None:
    L = loaded.info.num_blocks
    if not 0 <= top < L - split:
        raise ConfigError(f"top {top} does not fit split {split} of {loaded.info.id} ({L} blocks): the server must keep "
                          f"at least one block, choose 0 <= top <= {L - split - 1}")


def build_middle(loaded: "LoadedModel", split: int, top: int) -> Middle:
    """The server's blocks ``split..L-top-1``; ``1 <= split``, ``0 <= top`` and at least one block."""
    _check_split(loaded, split)
    _check_top(loaded, split, top)
    return Middle(loaded, split, top).eval()


def build_top(loaded: "LoadedModel", top: int) -> Top:
    """The device's last ``top`` blocks + final norm + task head; ``0 <= top <= L-2`` (a head and a middle block remain)."""
    _check_top(loaded, 1, top)
    return Top(loaded, top).eval()


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Mean cross-entropy. Causal LM predicts token t+1 from position t; label -100 is ignored."""
    if task == "causal_lm":
        return nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
    return nn.functional.cross_entropy(logits, labels)
