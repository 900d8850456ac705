"""Batched decoding with a KV cache for the three tasks.

- Reports: Hugging Face ``generate`` (greedy, beam or nucleus) with every image id and special token
  suppressed, so only text can come out; greedy reports may contrast the image with random image codes
  (visual contrastive decoding, ``generate.image_contrast``).
- Images: our own loop. After the prompt's ``<boi>`` it takes exactly N steps, each restricted to the K image
  ids, then the span is closed with ``<eoi>``: an image is always N valid codes, with no retry loop.
  Classifier-free guidance runs the conditional and the unconditional prompt in one batch and mixes the
  logits: ``u + s * (c - u)``.
- Closed VQA: each answer in the question's answer set is scored by its log-likelihood after the prompt and
  the scores are normalised over the set (probabilities, hence AUROC). Open questions decode text.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from mavilt.errors import ConfigError
from mavilt.llm.decode import LlamaDecoder
from mavilt.llm.vocab import JointVocab


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, n - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, n - len(p):] = 1
    return ids.to(device), mask.to(device)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---- text ------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_text(
    model: torch.nn.Module,
    vocab: JointVocab,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 96,
    num_beams: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    contrast_prompts: Sequence[Sequence[int]] | None = None,
    contrast: float = 0.0,
) -> list[list[int]]:
    """Text continuations (ids, without the prompt and without eos/pad).

    ``contrast`` > 0 with ``contrast_prompts`` (K per prompt, the same length, draw by draw: the first draw of
    every prompt, then the second, ...): greedy contrastive decoding, each token the argmax of
    ``(1 + contrast) * log p(t | prompt) - contrast * log q(t)`` among the tokens the prompt alone finds plausible,
    ``log q`` the mean over the K contrast prompts (see :func:`contrastive_choice`)."""
    from transformers import GenerationConfig

    if not prompts:
        return []
    dev = _device(model)
    contrastive = contrast > 0
    if contrastive:
        draws = len(contrast_prompts or []) // len(prompts)
        if not draws or [len(p) for p in contrast_prompts] != [len(p) for p in prompts] * draws:
            raise ValueError("contrastive decoding needs K >= 1 contrast prompts of the same length per prompt, "
                             "draw by draw")
        if num_beams != 1 or do_sample or not LlamaDecoder.supports(model):
            raise ConfigError(f"generate.image_contrast={contrast} works with greedy decoding of a Llama-style LM "
                              f"only: set generate.num_beams=1 and generate.do_sample=false, or image_contrast=0")
        prompts = [*prompts, *contrast_prompts]  # one batch: the contrast rows only score, they never choose
    ids, mask = left_pad(prompts, vocab.pad_id, dev)
    gc = GenerationConfig(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=top_k if do_sample and top_k > 0 else None,
        eos_token_id=vocab.eos_id,
        pad_token_id=vocab.pad_id,
        bos_token_id=vocab.bos_id,
        suppress_tokens=list(range(vocab.text_vocab_size, vocab.size)),  # no image ids, no <boi>/<eoi>
        use_cache=True,
    )
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    if num_beams == 1 and not do_sample and LlamaDecoder.supports(model):
        new = _greedy_text_lean(model, vocab, ids, mask, max_new_tokens, contrast if contrastive else 0.0,
                                draws if contrastive else 0)
    else:
        new = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)[:, ids.shape[1]:]
    model.train(was_training)
    results = []
    for row in new.tolist():
        text = []
        for t in row:
            if t in (vocab.eos_id, vocab.pad_id):
                break
            text.append(t)
        results.append(text)
    return results


def _greedy_text_lean(model, vocab: JointVocab, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                      contrast: float = 0.0, draws: int = 0) -> torch.Tensor:
    """Greedy decoding over the text ids on :class:`LlamaDecoder` (what ``generate`` does with the image ids
    suppressed), stopping once every row has written eos. Returns the new ids [B, <= max_new_tokens]. With
    ``contrast`` > 0 the rows after the first B are ``draws`` contrast prompts per row: every row is fed the
    token chosen by :func:`contrastive_choice` for its prompt, and only the first B are returned."""
    rows = ids.shape[0] // (1 + draws) if contrast else ids.shape[0]
    dec = LlamaDecoder(model, ids.shape[0], ids.shape[1] + max_new_tokens)
    hidden = dec.prefill(ids, mask)
    done = torch.zeros(rows, dtype=torch.bool, device=ids.device)
    out = []
    for step in range(max_new_tokens):
        logits = dec.logits(hidden, 0, vocab.text_vocab_size)
        if contrast:
            token = contrastive_choice(logits[:rows], logits[rows:].unflatten(0, (draws, rows)), contrast)
        else:
            token = logits.argmax(-1)
        token = token.masked_fill(done, vocab.pad_id)
        out.append(token)
        done |= token == vocab.eos_id
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        hidden = dec.step(token.repeat(1 + draws) if contrast else token)
    return torch.stack(out, dim=1) if out else ids.new_zeros(rows, 0)


# VCD's adaptive plausibility (Leng et al., 2024): only tokens at least this fraction as likely as the best one
# under the real image may be chosen, so the contrast promotes what the image supports and never invents a token
# the model finds implausible.
CONTRAST_PLAUSIBILITY = 0.1


def contrastive_choice(logits: torch.Tensor, contrast_logits: torch.Tensor, contrast: float) -> torch.Tensor:
    """Visual contrastive decoding: argmax of ``(1 + a) * log p - a * log q`` over the tokens with
    ``p >= CONTRAST_PLAUSIBILITY * max p``; ``p`` given the image, ``q`` given the contrast image
    (``contrast_logits`` [B, V]), or ``log q`` the mean over K contrast images ([K, B, V])."""
    logp, logq = logits.float().log_softmax(-1), contrast_logits.float().log_softmax(-1)
    if logq.dim() == logp.dim() + 1:
        logq = logq.mean(0)
    score = (1 + contrast) * logp - contrast * logq
    implausible = logp < logp.max(-1, keepdim=True).values + math.log(CONTRAST_PLAUSIBILITY)
    return score.masked_fill(implausible, float("-inf")).argmax(-1)


# ---- images ----------------------------------------------------------------------------------------------


def sample_logits(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float,
                  uniform: torch.Tensor | None) -> torch.Tensor:
    """Greedy when temperature == 0, otherwise top-k / nucleus sampling. logits: [B, K] -> [B].

    ``uniform`` [B] in [0, 1): each row's draw, inverted through its distribution's CDF. The caller draws them
    from each row's own seeded stream, so a row's sample never depends on the other rows, and the step is one
    batched operation on the logits' device (no per-row loop, no copy to the host)."""
    if temperature <= 0:
        return logits.argmax(-1)
    if uniform is None:
        raise ValueError("sampling (temperature > 0) needs one uniform draw per row")
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        cum = probs.cumsum(-1)
        drop = cum - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    cdf = logits.float().softmax(-1).cumsum(-1)
    # right=True: the first id whose CDF exceeds the draw, so an id of zero probability is never chosen.
    target = (uniform.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)


@torch.no_grad()
def generate_image_codes(
    model: torch.nn.Module,
    vocab: JointVocab,
    prompts: Sequence[Sequence[int]],
    *,
    uncond_prompts: Sequence[Sequence[int]] | None = None,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | Sequence[int] = 0,
) -> torch.Tensor:
    """Exactly N codes per prompt (each prompt ends with ``<boi>``): LongTensor [B, N] in [0, K).

    ``seed``: one per prompt, or an int giving prompt i the seed ``seed + i``. Each prompt samples from its own
    stream, so an image depends on its prompt and seed, not on the prompts batched with it (a server batches
    strangers' requests)."""
    for p in prompts:
        if not p or p[-1] != vocab.boi_id:
            raise ValueError("every image prompt must end with <boi>")
    b = len(prompts)
    guided = cfg_scale != 1.0
    if guided:
        if uncond_prompts is None or len(uncond_prompts) != b:
            raise ValueError("classifier-free guidance needs one unconditional prompt per prompt")
        all_prompts = list(prompts) + list(uncond_prompts)
    else:
        all_prompts = list(prompts)
    dev = _device(model)
    ids, mask = left_pad(all_prompts, vocab.pad_id, dev)
    seeds = [seed + i for i in range(b)] if isinstance(seed, int) else [int(x) for x in seed]
    if len(seeds) != b:
        raise ValueError(f"one seed per prompt: got {len(seeds)} seeds for {b} prompts")
    # Every row's draws for all N steps at once, from its own stream.
    draws = torch.stack([torch.rand(vocab.tokens_per_image, generator=torch.Generator().manual_seed(x))
                         for x in seeds]).to(dev)
    lo, hi = vocab.first_image_id, vocab.first_image_id + vocab.codebook_size
    n = vocab.tokens_per_image
    was_training = model.training
    model.eval()

    def choose(logits: torch.Tensor, step: int) -> torch.Tensor:
        """logits [B or 2B, K] over the image ids -> each prompt's code [B] (guided: u + s * (c - u))."""
        if guided:
            logits = logits[b:] + cfg_scale * (logits[:b] - logits[b:])
        return sample_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, uniform=draws[:, step])

    loop = _image_codes_lean if LlamaDecoder.supports(model) else _image_codes_hf
    codes = loop(model, ids, mask, lo, hi, n, choose)
    model.train(was_training)
    return codes.cpu()


def _image_codes_lean(model, ids, mask, lo: int, hi: int, n: int, choose) -> torch.Tensor:
    """The decode loop on :class:`LlamaDecoder`: logits over the K image ids only, the cache written in place."""
    dec = LlamaDecoder(model, ids.shape[0], ids.shape[1] + n)
    hidden = dec.prefill(ids, mask)
    codes = []
    for step in range(n):
        code = choose(dec.logits(hidden, lo, hi), step)
        codes.append(code)
        if step + 1 < n:  # the last code needs no forward: the caller closes the span with <eoi>
            hidden = dec.step((code + lo).repeat(ids.shape[0] // code.shape[0]))  # guided: both halves go on alike
    return torch.stack(codes, dim=1)


def _image_codes_hf(model, ids, mask, lo: int, hi: int, n: int, choose) -> torch.Tensor:
    """The same loop on the Hugging Face forward and its cache, for any other architecture."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_arg = _cache_arg(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = _cache_of(out)
    last_pos = positions[:, -1:]
    codes = []
    for step in range(n):
        code = choose(out.logits[:, -1, lo:hi].float(), step)  # only image ids can be chosen
        codes.append(code)
        if step + 1 == n:
            break
        nxt = (code + lo).unsqueeze(-1).repeat(ids.shape[0] // code.shape[0], 1)  # guided: both halves go on alike
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=-1)
        last_pos = last_pos + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=last_pos, use_cache=True, **{cache_arg: cache})
        cache = _cache_of(out)
    return torch.stack(codes, dim=1)


def _cache_arg(model: torch.nn.Module) -> str:
    """transformers 5.2x calls the KV cache ``cache``; earlier releases ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


# ---- closed questions ------------------------------------------------------------------------------------


@torch.no_grad()
def choice_log_likelihoods(
    model: torch.nn.Module, vocab: JointVocab, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
    batch_size: int = 64,
) -> np.ndarray:
    """log p(continuation | prompt), summed over the continuation's tokens, for each pair."""
    dev = _device(model)
    scores = np.zeros(len(prompts), dtype=np.float64)
    was_training = model.training
    model.eval()
    for s in range(0, len(prompts), batch_size):
        ps, cs = prompts[s : s + batch_size], continuations[s : s + batch_size]
        seqs = [list(p) + list(c) for p, c in zip(ps, cs)]
        n = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), n), vocab.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, x in enumerate(seqs):
            ids[i, : len(x)] = torch.tensor(x)
            attn[i, : len(x)] = 1
        logp = model(input_ids=ids.to(dev), attention_mask=attn.to(dev)).logits.float().log_softmax(-1).cpu()
        for i, (p, c) in enumerate(zip(ps, cs)):
            pos = torch.arange(len(p) - 1, len(p) + len(c) - 1)
            scores[s + i] = float(logp[i, pos, torch.tensor(list(c))].sum())
    model.train(was_training)
    return scores


def answer_probabilities(
    model: torch.nn.Module, vocab: JointVocab, codec, prompts: Sequence[Sequence[int]], choice_sets: Sequence[Sequence[str]]
) -> list[np.ndarray]:
    """For each prompt, a probability per answer in its set (softmax of the answers' log-likelihoods)."""
    from mavilt.llm.tasks import VQA

    flat_p, flat_c, owner = [], [], []
    for i, (p, choices) in enumerate(zip(prompts, choice_sets)):
        for c in choices:
            flat_p.append(p)
            flat_c.append(VQA.answer_ids(vocab, codec, c))
            owner.append(i)
    ll = choice_log_likelihoods(model, vocab, flat_p, flat_c)
    out: list[list[float]] = [[] for _ in prompts]
    for i, v in zip(owner, ll):
        out[i].append(v)
    probs = []
    for v in out:
        a = np.asarray(v)
        e = np.exp(a - a.max())
        probs.append(e / e.sum())
    return probs
