"""The joint vocabulary: text ids from the LLM's tokenizer, then K image codes, then special tokens.

The mapping is arithmetic (no string token per code): image id = V + code, with V the text vocabulary size
at load time. ``<boi>`` = V + K and ``<eoi>`` = V + K + 1. An image is always exactly ``<boi>`` + N codes +
``<eoi>`` with N = (image_size / f) ** 2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


class VocabError(ValueError):
    pass


@dataclass(frozen=True)
class JointVocab:
    text_vocab_size: int  # V: the first image id
    codebook_size: int  # K
    tokens_per_image: int  # N
    pad_id: int
    bos_id: int | None
    eos_id: int

    @property
    def first_image_id(self) -> int:
        return self.text_vocab_size

    @property
    def boi_id(self) -> int:
        return self.text_vocab_size + self.codebook_size

    @property
    def eoi_id(self) -> int:
        return self.boi_id + 1

    @property
    def size(self) -> int:
        """Rows the embedding and the output head need."""
        return self.eoi_id + 1

    @property
    def new_ids(self) -> list[int]:
        """Ids added to the LLM: every image code plus the special tokens."""
        return list(range(self.text_vocab_size, self.size))

    # ---- arithmetic -------------------------------------------------------------------------------
    def image_ids(self, codes):
        """Codes in [0, K) -> ids in [V, V + K); works on ints, numpy arrays and tensors."""
        _check_range(codes, 0, self.codebook_size, "image code")
        return codes + self.text_vocab_size

    def codes(self, ids):
        """Ids in [V, V + K) -> codes in [0, K)."""
        _check_range(ids, self.text_vocab_size, self.text_vocab_size + self.codebook_size, "image token id")
        return ids - self.text_vocab_size

    def is_image(self, ids):
        return (ids >= self.text_vocab_size) & (ids < self.text_vocab_size + self.codebook_size)

    def image_span(self, codes) -> list[int]:
        """``<boi>`` + N image ids + ``<eoi>`` for one image's codes."""
        codes = np.asarray(codes, dtype=np.int64).reshape(-1)
        if codes.shape[0] != self.tokens_per_image:
            raise VocabError(f"an image has {self.tokens_per_image} codes, got {codes.shape[0]}")
        return [self.boi_id, *self.image_ids(codes).tolist(), self.eoi_id]

    # ---- persistence ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(first_image_id=self.first_image_id, boi_id=self.boi_id, eoi_id=self.eoi_id, size=self.size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JointVocab":
        v = cls(**{k: d[k] for k in ("text_vocab_size", "codebook_size", "tokens_per_image", "pad_id", "bos_id", "eos_id")})
        for k in ("boi_id", "eoi_id", "size"):
            if k in d and d[k] != getattr(v, k):
                raise VocabError(f"saved vocabulary says {k}={d[k]} but its sizes give {getattr(v, k)}: the file is inconsistent")
        return v

    @classmethod
    def for_tokenizer(cls, tokenizer, codebook_size: int, tokens_per_image: int) -> "JointVocab":
        """V is ``len(tokenizer)`` (every text id, added specials included)."""
        eos = tokenizer.eos_token_id
        if eos is None:
            raise VocabError("the text tokenizer has no eos token; set one (tokenizer.eos_token = ...) before training")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        return cls(
            text_vocab_size=len(tokenizer),
            codebook_size=codebook_size,
            tokens_per_image=tokens_per_image,
            pad_id=pad,
            bos_id=tokenizer.bos_token_id,
            eos_id=eos,
        )


def _check_range(x, lo: int, hi: int, what: str) -> None:
    if isinstance(x, torch.Tensor):
        bad = bool(((x < lo) | (x >= hi)).any()) if x.numel() else False
    else:
        arr = np.asarray(x)
        bad = bool(((arr < lo) | (arr >= hi)).any()) if arr.size else False
    if bad:
        raise VocabError(f"{what} out of range [{lo}, {hi})")
