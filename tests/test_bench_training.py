"""The training benchmark's FLOP count (its MFU's numerator) against torch's own FLOP counter on a real step of
the loop's scored head; the benchmark itself runs Ray Train and stays out of CI (`make bench`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_training_flops_per_token_matches_torchs_count_of_a_scored_step():
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    from common import training_flops_per_token
    from mavilt.train.llm_loop import ScoredHead, masked_lm_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=128))
    model.set_attn_implementation("eager")  # torch counts eager attention's products (not the fused CPU kernel)
    b, t = 4, 48
    ids = torch.randint(0, 500, (b, t))
    labels = torch.full((b, t), -100)
    labels[:, 30:] = ids[:, 30:]  # the last 18 tokens are the response: 17 of each row's 48 positions scored
    head = ScoredHead(model)
    with FlopCounterMode(display=False) as counter:
        with head.scoring(labels) as keep:
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        loss, _ = masked_lm_loss(logits, labels, ["report"] * b, keep)
        loss.backward()
    fraction = int(keep.sum()) / (b * t)
    assert fraction == pytest.approx(18 / 48)
    assert logits.shape == (int(keep.sum()), 500)
    per_token = counter.get_total_flops() / (b * t)
    # Attention: QK^T and AV, 4*T*d per token forward and twice that backward: 12*L*d*T in all.
    assert training_flops_per_token(model, t, fraction) == pytest.approx(per_token, rel=0.02)
