"""Text to token ids on the device, from a bundle's ``tokenizer.json`` (the `tokenizers` library).

:class:`TextEncoder` turns a batch of strings into ``input_ids`` and ``attention_mask``, both
int64 ``[B, T]``, exactly as the model's Hugging Face tokenizer would: the special tokens are
whatever the tokenizer.json post-processor adds (BERT: ``[CLS] ... [SEP]``; SmolLM2: none),
sequences are cut to ``max_seq`` tokens (special tokens included) and padded with the model's
pad id to the longest sequence in the batch, or always to ``max_seq`` with ``fixed_length``.

The pad id comes from the ``pad_id`` argument, else from the tokenizer.json padding config. A
tokenizer without one (SmolLM2's, which pads with ``<|im_end|>``) needs ``pad_id``: guessing
would silently feed the model a token it was never trained to ignore.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import tokenizers

from flexsfl.core.errors import BundleError, ConfigError

if TYPE_CHECKING:
    from flexsfl.core.bundle import Bundle

__all__ = ["TokenBatch", "TextEncoder"]

# The exported head programs take 2 <= T <= max_seq: torch.export specializes a dynamic dim
# whose example size is 1, so bundles never accept a single-token sequence.
_BUNDLE_MIN_SEQ = 2


@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """Model inputs for B texts; T is the padded length."""

    input_ids: np.ndarray  # int64 [B, T]
    attention_mask: np.ndarray  # int64 [B, T]: 1 for real tokens, 0 for padding

    @property
    def shape(self) -> tuple[int, int]:
        return (self.input_ids.shape[0], self.input_ids.shape[1])


class TextEncoder:
    """Encodes text batches with a fixed tokenizer, length limit and pad id.

    The encoder owns a private copy of the tokenizer, whose truncation and padding settings it
    replaces (a tokenizer.json may carry its own, e.g. MiniLM's fixed padding to 128); the
    truncation and padding *direction* of the tokenizer.json are kept.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        max_seq: int,
        pad_id: int | None = None,
        fixed_length: bool = False,
        min_seq: int = 1,
        name: str = "tokenizer",
    ) -> None:
        for field, v in (("max_seq", max_seq), ("min_seq", min_seq)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{field} must be an int >= 1, got {v!r}")
        if min_seq > max_seq:
            raise ConfigError(f"min_seq {min_seq} is larger than max_seq {max_seq}")
        tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._vocab_size = tok.get_vocab_size(with_added_tokens=True)
        padding, truncation = tok.padding, tok.truncation
        if pad_id is None:
            if padding is None:
                raise ConfigError(
                    f"{name}: no padding config and no pad_id given; pass pad_id=<the model's "
                    f"pad_token_id> (SmolLM2: the id of <|im_end|>)"
                )
            pad_id = padding["pad_id"]
        if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < self._vocab_size:
            raise ConfigError(f"{name}: pad_id {pad_id!r} is not a token id (vocabulary has {self._vocab_size})")
        tok.enable_truncation(
            max_length=max_seq,
            strategy=truncation["strategy"] if truncation else "longest_first",
            direction=truncation["direction"] if truncation else "right",
        )
        tok.enable_padding(
            direction=padding["direction"] if padding else "right",
            pad_id=pad_id,
            pad_token=tok.id_to_token(pad_id),
            length=max_seq if fixed_length else None,
        )
        self._tok = tok
        self._left = (padding or {}).get("direction") == "left"
        self.max_seq = max_seq
        self.min_seq = min_seq
        self.pad_id = pad_id
        self.fixed_length = fixed_length

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        *,
        max_seq: int,
        pad_id: int | None = None,
        fixed_length: bool = False,
        min_seq: int = 1,
    ) -> "TextEncoder":
        """Load a ``tokenizer.json`` (raises :class:`BundleError` if it is missing or invalid)."""
        try:
            tok = tokenizers.Tokenizer.from_file(os.fspath(path))
        except Exception as e:  # tokenizers raises a bare Exception for every failure
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BundleError(f"{path}: not a loadable tokenizer.json ({first}); re-export the bundle") from None
        return cls(tok, max_seq=max_seq, pad_id=pad_id, fixed_length=fixed_length, min_seq=min_seq, name=str(path))

    @classmethod
    def from_bundle(cls, bundle: "Bundle", *, pad_id: int | None = None, fixed_length: bool = False) -> "TextEncoder":
        """The encoder a bundle's programs expect: its tokenizer, ``max_seq`` and T >= 2."""
        enc = cls.from_file(
            bundle.tokenizer_path,
            max_seq=bundle.manifest.max_seq,
            pad_id=pad_id,
            fixed_length=fixed_length,
            min_seq=min(_BUNDLE_MIN_SEQ, bundle.manifest.max_seq),
        )
        if enc.vocab_size > bundle.manifest.model.vocab_size:
            raise BundleError(
                f"{bundle.tokenizer_path}: tokenizer has {enc.vocab_size} tokens but the model embeds "
                f"{bundle.manifest.model.vocab_size}; the bundle mixes two models, re-export it"
            )
        return enc

    @property
    def vocab_size(self) -> int:
        """Token ids are ``0 <= id < vocab_size`` (added tokens included)."""
        return self._vocab_size

    def encode(self, texts: Sequence[str]) -> TokenBatch:
        """Token ids and mask for B >= 1 texts; T = longest (at least ``min_seq``) or ``max_seq``."""
        if isinstance(texts, str):
            raise ConfigError("texts must be a list of strings, not one string; wrap it in a list")
        texts = list(texts)
        if not texts:
            raise ConfigError("texts is empty; encode at least one text")
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise ConfigError(f"texts[{bad}] is a {type(texts[bad]).__name__}, not a string")
        encs = self._tok.encode_batch(texts)
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        short = self.min_seq - ids.shape[1]
        if short > 0:
            # `tokenizers` pads to the longest or to a fixed length, never to "at least n".
            side = (short, 0) if self._left else (0, short)
            ids = np.pad(ids, ((0, 0), side), constant_values=self.pad_id)
            mask = np.pad(mask, ((0, 0), side), constant_values=0)
        return TokenBatch(ids, mask)

    __call__ = encode

    def lm_labels(self, batch: TokenBatch, prompts: Sequence[str] | None = None) -> np.ndarray:
        """Causal-LM labels [B, T] int64 for an encoded batch: the token ids, -100 on padding and
        on each row's prompt tokens (instruction format: the loss is on the response only).

        ``prompts[i]`` is a prefix of the text row ``i`` was encoded from ("" for none). Its
        tokens are the longest common prefix of its own encoding and the row's real tokens, so a
        token that merges across the prompt/response boundary stays labelled, and special tokens
        the tokenizer appends to every text (an EOS) are not counted as prompt. Works for left
        and right padding.
        """
        ids, mask = batch.input_ids, batch.attention_mask
        labels = np.where(mask == 1, ids, -100).astype(np.int64)
        if not prompts or not any(prompts):
            return labels
        if len(prompts) != ids.shape[0]:
            raise ConfigError(f"{len(prompts)} prompts for a batch of {ids.shape[0]} texts; pass one per text")
        for i, enc in enumerate(self._tok.encode_batch(list(prompts))):
            if not prompts[i]:
                continue
            real = np.flatnonzero(mask[i] == 1)
            p = np.array([t for t, m in zip(enc.ids, enc.attention_mask) if m], dtype=np.int64)
            n = min(len(p), len(real))
            same = ids[i, real[:n]] == p[:n]
            k = n if same.all() else int(np.argmin(same))
            labels[i, real[:k]] = -100
        return labels

