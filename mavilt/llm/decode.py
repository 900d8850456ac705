"""A lean incremental decoder for Llama-family models (Llama, Mistral, Qwen2): a static KV cache and the model's
own weights, one call per layer and step.

Why by hand: decoding one token for a batch costs little arithmetic, so Hugging Face's per-step machinery (a
growing cache concatenated each step, the attention mask rebuilt from the whole 2-D mask, rotary tables
recomputed, logits over the whole vocabulary) cost several times the arithmetic on CPU. Here the cache is
preallocated and written in place, the rotary tables are computed once for every position, the q/k/v and
gate/up projections run as one matrix product each (their weights concatenated once per call), and the output
head is evaluated only over the ids the caller may choose (the K image codes, or the text ids). HF's own
``StaticCache`` + ``torch.compile`` would do the same on a GPU but costs tens of seconds of compilation per
shape on CPU. Any other architecture (or a PEFT-wrapped model) keeps the Hugging Face path: see
:func:`LlamaDecoder.supports`.

The arithmetic is the model's own (its norms, activation, rotary module and weights); the outputs agree with
the Hugging Face forward to float rounding (``tests/test_generate.py`` checks logits and decoded ids).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

_FAMILIES = ("llama", "mistral", "qwen2")
_FUSED: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


class LlamaDecoder:
    """Prefill a left-padded batch of prompts, then feed one token per row per step.

    ``hidden = dec.prefill(ids, mask)`` returns the last position's final hidden state [B, d];
    ``dec.logits(hidden, lo, hi)`` the logits of ids ``lo..hi-1`` only; ``dec.step(tokens)`` appends one token per
    row and returns the new hidden state. ``capacity``: prompt length + the most tokens that will be appended.
    """

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        cfg = getattr(model, "config", None)
        inner = getattr(model, "model", None)
        if cfg is None or getattr(cfg, "model_type", None) not in _FAMILIES or inner is None:
            return False
        if not hasattr(model, "lm_head") or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
            return False
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            return False  # a window shorter than the sequence changes the mask; HF handles it
        layer = inner.layers[0]
        attn, mlp = layer.self_attn, layer.mlp
        return all(isinstance(getattr(attn, n, None), torch.nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) \
            and all(isinstance(getattr(mlp, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))

    @torch.no_grad()
    def __init__(self, model: torch.nn.Module, batch: int, capacity: int):
        inner = model.model
        self.model, self.inner = model, inner
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        attn0 = inner.layers[0].self_attn
        self.head_dim = attn0.head_dim
        self.n_heads = attn0.q_proj.out_features // self.head_dim
        self.n_kv = attn0.k_proj.out_features // self.head_dim
        self.scaling = attn0.scaling
        self.layers = self._fused_layers(model)
        shape = (batch, self.n_kv, capacity, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in inner.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in inner.layers]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=self.device)
        # cos/sin for every position this call can reach, once (the model's own rotary module: any scaling).
        positions = torch.arange(capacity, device=self.device)[None]
        cos, sin = inner.rotary_emb(torch.zeros(1, dtype=self.dtype, device=self.device), positions)
        # rotate_half(x) * sin == x.roll(half) * sin with its first half negated: one op fewer per use.
        half = self.head_dim // 2
        sign = torch.cat([-torch.ones(half), torch.ones(self.head_dim - half)]).to(sin)
        self.cos, self.sin = cos[0], sin[0] * sign  # [capacity, head_dim]
        self.length = 0  # cache slots used
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.capacity = capacity
        self.final_norm = self._norm(inner.norm)

    def _fused_layers(self, model: torch.nn.Module) -> list[tuple]:
        """Each layer's weights as this decoder uses them (q/k/v and gate/up concatenated, the attention scale
        in the query rows), built once per model and kept until a weight changes (a training step between two
        validations bumps the tensors' version counters) or the model is gone."""
        key = tuple((p.data_ptr(), p._version) for p in model.parameters())
        cached = _FUSED.get(model)
        if cached is not None and cached[0] == key:
            return cached[1]
        layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            # The attention's scale folded into the query rows (rotation is linear, so it commutes).
            qkv_w = torch.cat([a.q_proj.weight * self.scaling, a.k_proj.weight, a.v_proj.weight])
            qkv_b = (torch.cat([a.q_proj.bias * self.scaling, a.k_proj.bias, a.v_proj.bias])
                     if a.q_proj.bias is not None else None)
            gu_b = torch.cat([m.gate_proj.bias, m.up_proj.bias]) if m.gate_proj.bias is not None else None
            layers.append((self._norm(layer.input_layernorm), qkv_w, qkv_b, a.o_proj.weight, a.o_proj.bias,
                           self._norm(layer.post_attention_layernorm),
                           torch.cat([m.gate_proj.weight, m.up_proj.weight]), gu_b, m.act_fn,
                           m.down_proj.weight, m.down_proj.bias))
        _FUSED[model] = (key, layers)
        return layers

    @staticmethod
    def _norm(module: torch.nn.Module):
        """The model's RMSNorm as one fused op (``F.rms_norm``: the same formula, ~7 fewer kernel calls per use);
        any other norm module is called as it is."""
        eps, weight = getattr(module, "variance_epsilon", None), getattr(module, "weight", None)
        if type(module).__name__.endswith("RMSNorm") and eps is not None and weight is not None and weight.ndim == 1:
            return lambda x: F.rms_norm(x, weight.shape, weight, eps)
        return module

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """The model's rotary embedding: x * cos + rotate_half(x) * sin."""
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)

    def _layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
        """h [B, T, d] at cache slots start..start+T-1; mask [B, 1, T, start+T]: boolean (True: may attend) for a
        prompt, additive float for one new token."""
        b, t, _ = h.shape
        nq, nk, hd = self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.head_dim
        end = start + t
        for i, (norm1, qkv_w, qkv_b, o_w, o_b, norm2, gu_w, gu_b, act, down_w, down_b) in enumerate(self.layers):
            qkv = F.linear(norm1(h), qkv_w, qkv_b)
            qk = self._rotate(qkv[..., :nq + nk].view(b, t, -1, hd).transpose(1, 2), cos, sin)  # q and k at once
            q, k = qk[:, :self.n_heads], qk[:, self.n_heads:]
            v = qkv[..., nq + nk:].view(b, t, -1, hd).transpose(1, 2)
            self.k[i][:, :, start:end] = k
            self.v[i][:, :, start:end] = v
            keys, values = self.k[i][:, :, :end], self.v[i][:, :, :end]
            if t == 1:  # one new token: three small products beat the fused CPU kernel (~5x at these sizes)
                scores = torch.matmul(q.reshape(b, self.n_kv, -1, hd), keys.transpose(-1, -2))
                probs = (scores.float() + mask).softmax(-1).to(values.dtype)
                out = torch.matmul(probs, values).view(b, self.n_heads, 1, hd)
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0,
                                                     enable_gqa=self.n_kv != self.n_heads)
            h = h + F.linear(out.transpose(1, 2).reshape(b, t, nq), o_w, o_b)
            gate, up = F.linear(norm2(h), gu_w, gu_b).chunk(2, dim=-1)
            h = h + F.linear(act(gate) * up, down_w, down_b)
        return h

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask [B, T] left-padded. Returns the final hidden state of each row's last token [B, d]."""
        b, t = ids.shape
        if t > self.capacity:
            raise ValueError(f"prompt of {t} tokens exceeds the decoder's capacity {self.capacity}")
        valid = mask.bool()
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        self.valid[:, :t] = valid
        causal = torch.ones(t, t, dtype=torch.bool, device=self.device).tril()
        # A padding query attends to itself only, so no row is all -inf (its output is never used).
        attend = (causal[None] & valid[:, None, :]) | torch.eye(t, dtype=torch.bool, device=self.device)[None]
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        h = self._layers(self.inner.embed_tokens(ids), cos, sin, attend[:, None], 0)
        self.length = t
        self.next_pos = positions[:, -1] + 1
        return self.final_norm(h[:, -1])

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (tokens [B]); returns the new final hidden states [B, d]."""
        s = self.length
        if s >= self.capacity:
            raise ValueError(f"the decoder's capacity of {self.capacity} tokens is used up")
        self.valid[:, s] = True
        pos = self.next_pos
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]
        # An additive mask, built once for all layers: 0 where a row may attend, -inf on its left padding.
        mask = torch.zeros(self.valid.shape[0], 1, 1, s + 1, device=self.device).masked_fill_(~self.valid[:, None, None, :s + 1], float("-inf"))
        h = self._layers(self.inner.embed_tokens(tokens[:, None]), cos, sin, mask, s)
        self.length = s + 1
        self.next_pos = pos + 1
        return self.final_norm(h[:, -1])

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Logits of ids lo..hi-1 only, in float32: [B, hi - lo]."""
        head = self.model.lm_head
        bias = head.bias[lo:hi] if head.bias is not None else None
        return F.linear(hidden, head.weight[lo:hi], bias).float()
