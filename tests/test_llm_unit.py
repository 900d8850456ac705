"""The LLM half without Ray: vocabulary arithmetic, task formats and loss masks, bucketing, lambda_reg,
theta_0 hand-off, constrained generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mavilt.checkpoints import Theta0Files
from mavilt.config import load_config
from mavilt.errors import ConfigError
from mavilt.llm.generate import (
    CONTRAST_PLAUSIBILITY,
    answer_probabilities,
    contrastive_choice,
    generate_image_codes,
    generate_text,
    sample_logits,
)
from mavilt.llm.model import (
    apply_finetune_mode,
    build_tiny_lm,
    extend_vocabulary,
    load_theta0_model,
    save_theta0,
)
from mavilt.llm.regularization import Regularizer, theta0_state
from mavilt.llm.sequences import IGNORE, TextCodec, bucket_batches, collate
from mavilt.llm.tasks import (
    REPORT,
    SYNTHESIZE,
    TEXT,
    VQA,
    ExampleSettings,
    epoch_examples,
    get_task,
)
from mavilt.llm.textdata import train_bpe_tokenizer
from mavilt.llm.vocab import JointVocab, VocabError

TEXTS = [
    "The heart size is normal. No pleural effusion or pneumothorax.",
    "Moderate cardiomegaly. Small left pleural effusion.",
    "The lungs are clear. No focal consolidation.",
    "Right lower lobe consolidation, could represent pneumonia.",
] * 30


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("llm")
    tok = train_bpe_tokenizer(TEXTS, 320, d / "tok")
    cfg = load_config("tiny", ["llm.hidden_size=64", "llm.num_layers=2", "llm.num_heads=2", "llm.intermediate_size=128"])
    torch.manual_seed(0)
    model = build_tiny_lm(cfg.llm, tok)
    model.save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    vocab = JointVocab.for_tokenizer(tok, codebook_size=32, tokens_per_image=16)
    extend_vocabulary(model, vocab, seed=0)
    save_theta0(Theta0Files(d / "theta0"), d / "base", model, vocab)
    return {"dir": d, "tok": tok, "cfg": cfg, "model": model, "vocab": vocab, "codec": TextCodec(tok)}


def settings(small, **kw) -> ExampleSettings:
    return ExampleSettings(small["vocab"], small["codec"], **{"section": "findings", "max_length": 200, **kw})


def task_example(small, task: str, r, seed: int = 0, **kw):
    return get_task(task).example(r, settings(small, **kw), np.random.default_rng(seed))


def padding_fraction(batches: list[list[int]], lengths) -> float:
    """Share of padded positions."""
    total = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    return 1 - real / total if total else 0.0


def row(codes=None, findings="Moderate cardiomegaly. Small left pleural effusion.", vqa=True):
    return {
        "codes": np.arange(16) % 32 if codes is None else codes,
        "findings": findings,
        "impression": "Cardiomegaly and effusion.",
        "vqa": [{"question": "Is there a pleural effusion?", "answer": "yes", "type": "presence", "choices": ["yes", "no"]}] if vqa else [],
    }


# ---- vocabulary ---------------------------------------------------------------------------------------


def test_vocab_arithmetic_round_trips():
    v = JointVocab(text_vocab_size=1000, codebook_size=256, tokens_per_image=64, pad_id=0, bos_id=1, eos_id=2)
    codes = np.arange(256)
    ids = v.image_ids(codes)
    assert ids.min() == 1000 and ids.max() == 1255
    assert np.array_equal(v.codes(ids), codes)
    assert torch.equal(v.codes(v.image_ids(torch.arange(256))), torch.arange(256))
    assert (v.boi_id, v.eoi_id, v.size) == (1256, 1257, 1258)
    assert v.is_image(np.array([999, 1000, 1255, 1256])).tolist() == [False, True, True, False]
    span = v.image_span(np.zeros(64, dtype=int))
    assert len(span) == 66 and span[0] == v.boi_id and span[-1] == v.eoi_id
    assert JointVocab.from_dict(v.to_dict()) == v
    with pytest.raises(VocabError, match="out of range"):
        v.image_ids(np.array([256]))
    with pytest.raises(VocabError, match="out of range"):
        v.codes(np.array([999]))
    with pytest.raises(VocabError, match="64 codes"):
        v.image_span(np.zeros(10, dtype=int))
    bad = v.to_dict() | {"boi_id": 5}
    with pytest.raises(VocabError, match="inconsistent"):
        JointVocab.from_dict(bad)


def test_extended_model_has_new_rows_near_the_mean(small):
    m, v = small["model"], small["vocab"]
    w = m.get_input_embeddings().weight.detach()
    assert w.shape[0] == v.size
    old, new = w[: v.text_vocab_size], w[v.text_vocab_size:]
    assert torch.allclose(new.mean(0), old.mean(0), atol=3 * old.std(0).max().item())
    assert new.std(0).mean() > 0  # distinct rows
    assert m.get_output_embeddings().weight.shape[0] == v.size


def test_theta0_reference_round_trip(small):
    m2, v2 = load_theta0_model(Theta0Files(small["dir"] / "theta0"), small["cfg"].llm)
    assert v2 == small["vocab"]
    for (n, a), (_, b) in zip(small["model"].state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n


# ---- sequences and loss masks ------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["image_to_report", "report", "report_to_image", "synthesize", "vqa"])
def test_loss_mask_covers_exactly_the_response(small, task):
    v, codec = small["vocab"], small["codec"]
    ex = task_example(small, task, row())
    ids = np.array(ex.input_ids)
    mask = np.array(ex.loss_mask)
    first = int(np.argmax(mask))
    assert mask[first:].all() and not mask[:first].any()  # one contiguous response at the end
    response = ids[mask]
    if task in ("report_to_image", "synthesize"):
        assert ids[first - 1] == v.boi_id
        assert len(response) == v.tokens_per_image + 1 and response[-1] == v.eoi_id
        assert np.array_equal(v.codes(response[:-1]), row()["codes"])
    else:
        assert response[-1] == v.eos_id
        text = codec.decode(response[:-1].tolist())
        assert text == ("yes" if task == "vqa" else row()["findings"])
        assert not v.is_image(response).any()
    batch = collate([ex], v.pad_id)
    labels = batch["labels"][0]
    assert torch.equal(labels != IGNORE, torch.tensor(mask))


def test_prompts_share_formats_with_training(small):
    v, codec = small["vocab"], small["codec"]
    c = row()["codes"]
    ex = task_example(small, "report", row(), seed=3)
    prompt = [t for t, m in zip(ex.input_ids, ex.loss_mask) if not m]
    assert prompt in [REPORT.prompt(v, codec, c, section="findings", paraphrase=i) for i in range(4)]
    sp = SYNTHESIZE.prompt(v, codec, "Small effusion.")
    assert sp[-1] == v.boi_id and sp[0] == v.bos_id
    unc = SYNTHESIZE.prompt(v, codec, None)
    dropped = task_example(small, "synthesize", row(), condition_dropout=1.0)
    assert [t for t, m in zip(dropped.input_ids, dropped.loss_mask) if not m] == unc
    vp = VQA.prompt(v, codec, c, "Is there a pleural effusion?")
    assert vp[1] == v.boi_id and vp[2 + v.tokens_per_image] == v.eoi_id


def test_long_reports_are_cut_to_fit_but_images_never(small):
    v = small["vocab"]
    long = " ".join(["The lungs are clear."] * 80)
    for task in ("report", "synthesize"):
        ex = task_example(small, task, row(findings=long), max_length=60)
        assert len(ex) <= 60
        if task == "synthesize":
            resp = np.array(ex.input_ids)[np.array(ex.loss_mask)]
            assert len(resp) == v.tokens_per_image + 1


def test_rows_without_reports_or_vqa_give_no_example(small):
    assert task_example(small, "vqa", row(vqa=False)) is None
    assert task_example(small, "report", row(findings="")) is None
    with pytest.raises(ConfigError, match="unknown task 'caption'"):
        task_example(small, "caption", row())


def test_epoch_examples_follow_task_weights_and_are_deterministic(small):
    rows = [row(codes=np.full(16, i % 32)) for i in range(20)]
    s = settings(small, condition_dropout=0.1)
    weights = {"report": 1.0, "synthesize": 2.0, "vqa": 0.5}
    a = epoch_examples(rows, weights, s, seed=1, epoch=0)
    b = epoch_examples(rows, weights, s, seed=1, epoch=0)
    c = epoch_examples(rows, weights, s, seed=1, epoch=1)
    counts = {t: sum(e.task == t for e in a) for t in ("report", "synthesize", "vqa")}
    assert counts == {"report": 20, "synthesize": 40, "vqa": 10}
    assert [e.input_ids for e in a] == [e.input_ids for e in b]
    assert [e.input_ids for e in a] != [e.input_ids for e in c]


def test_text_examples_window_long_documents(small):
    v = small["vocab"]
    doc = " ".join(TEXTS[:8])
    exs = TEXT.windows(doc, settings(small, max_length=16))
    assert all(len(e) <= 16 for e in exs) and len(exs) > 2
    assert all(e.input_ids[0] == v.bos_id and not e.loss_mask[0] and all(e.loss_mask[1:]) for e in exs)
    assert exs[-1].input_ids[-1] == v.eos_id


def test_bucketing_keeps_padding_small():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 200, size=2000).tolist()
    bucketed = bucket_batches(lengths, 16, seed=0, epoch=0)
    order = rng.permutation(2000).tolist()
    plain = [order[i : i + 16] for i in range(0, 2000 - 15, 16)]
    assert padding_fraction(bucketed, lengths) < 0.05 < padding_fraction(plain, lengths)
    assert len({i for b in bucketed for i in b}) == len(bucketed) * 16  # no example twice
    assert bucket_batches(lengths, 16, 0, 0) == bucketed and bucket_batches(lengths, 16, 0, 1) != bucketed


# ---- lambda_reg ---------------------------------------------------------------------------------------------


def test_regularizer_is_zero_at_theta0_and_its_gradient_is_2_lambda_delta(small):
    torch.manual_seed(0)
    m, _ = load_theta0_model(Theta0Files(small["dir"] / "theta0"), small["cfg"].llm)
    theta0 = theta0_state(m)
    reg = Regularizer(m, theta0, lam=0.3)
    assert float(reg.penalty()) == 0.0 and reg.metrics() == {"reg_term": 0.0, "drift": 0.0}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    m.zero_grad()
    pen = reg.penalty()
    pen.backward()
    expected_value = 0.0
    for n, p in m.named_parameters():
        delta = p.detach() - theta0[n]
        expected_value += float(delta.pow(2).sum())
        assert torch.allclose(p.grad, 2 * 0.3 * delta, atol=1e-6), n
    assert float(pen) == pytest.approx(0.3 * expected_value, rel=1e-5)
    assert reg.metrics()["drift"] == pytest.approx(expected_value**0.5, rel=1e-5)
    assert reg.metrics()["reg_term"] == pytest.approx(0.3 * expected_value, rel=1e-5)


def test_lora_penalty_is_the_merged_delta_norm(small):
    cfg = load_config("tiny", ["llm.finetune=lora", "llm.lora_r=4", "llm.hidden_size=64", "llm.num_layers=2",
                               "llm.num_heads=2", "llm.intermediate_size=128"])
    base, vocab = load_theta0_model(Theta0Files(small["dir"] / "theta0"), cfg.llm)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = apply_finetune_mode(base, cfg.llm, vocab)
    reg = Regularizer(model, {}, lam=1.0)
    assert reg.lora_pairs and reg.token_rows
    assert float(reg.penalty()) == pytest.approx(0.0, abs=1e-12)  # B = 0 and token deltas = 0 at start
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    merged = model.merge_and_unload()
    explicit = sum(float((p.detach() - before[n]).pow(2).sum()) for n, p in merged.named_parameters() if n in before)
    assert float(reg.squared_distance()) == pytest.approx(explicit, rel=1e-3)


def test_trainable_new_rows_in_lora_mode(small):
    cfg = load_config("tiny", ["llm.finetune=lora", "llm.lora_r=4", "llm.hidden_size=64", "llm.num_layers=2",
                               "llm.num_heads=2", "llm.intermediate_size=128"])
    base, vocab = load_theta0_model(Theta0Files(small["dir"] / "theta0"), cfg.llm)
    model = apply_finetune_mode(base, cfg.llm, vocab)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("trainable_tokens" in n for n in trainable)
    assert not any(n.endswith("embed_tokens.weight") and "token_adapter" not in n for n in trainable)


# ---- generation --------------------------------------------------------------------------------------------


def test_generated_image_spans_are_always_n_valid_codes(small):
    m, v, codec = small["model"], small["vocab"], small["codec"]
    prompts = [SYNTHESIZE.prompt(v, codec, t) for t in TEXTS[:3]] + [SYNTHESIZE.prompt(v, codec, None)]
    unc = [SYNTHESIZE.prompt(v, codec, None)] * 4
    for kwargs in ({"temperature": 0.0}, {"temperature": 1.0, "top_k": 5}, {"temperature": 1.0, "top_p": 0.5},
                   {"temperature": 1.0, "cfg_scale": 3.0, "uncond_prompts": unc}):
        codes = generate_image_codes(m, v, prompts, seed=1, **kwargs)
        assert codes.shape == (4, v.tokens_per_image)
        assert int(codes.min()) >= 0 and int(codes.max()) < v.codebook_size
    a = generate_image_codes(m, v, prompts, seed=5, temperature=1.0)
    b = generate_image_codes(m, v, prompts, seed=5, temperature=1.0)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="<boi>"):
        generate_image_codes(m, v, [prompts[0][:-1]])


def test_a_seeded_image_is_the_same_alone_and_batched_with_others(small):
    m, v, codec = small["model"], small["vocab"], small["codec"]
    prompts = [SYNTHESIZE.prompt(v, codec, t) for t in (TEXTS[0], TEXTS[1] + " " + TEXTS[2], TEXTS[1])]
    unc = [SYNTHESIZE.prompt(v, codec, None)] * 3
    for kwargs in ({"temperature": 1.0}, {"temperature": 1.0, "top_k": 5, "cfg_scale": 2.0}):
        batched = generate_image_codes(m, v, prompts, seed=[7, 3, 7], uncond_prompts=unc, **kwargs)
        alone = generate_image_codes(m, v, [prompts[0]], seed=[7], uncond_prompts=unc[:1], **kwargs)
        assert torch.equal(batched[0], alone[0])
        # An int seed gives row i the seed + i: the first row's image is the same as with seed=[7, ...].
        assert torch.equal(generate_image_codes(m, v, prompts[:2], seed=7, uncond_prompts=unc[:2], **kwargs)[0],
                           alone[0])
    other = generate_image_codes(m, v, [prompts[0]], seed=[8], temperature=1.0)
    assert not torch.equal(other[0], generate_image_codes(m, v, [prompts[0]], seed=[7], temperature=1.0)[0])
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate_image_codes(m, v, prompts, seed=[1, 2])


def test_image_generation_is_the_same_batched_and_alone(small):
    m, v, codec = small["model"], small["vocab"], small["codec"]
    prompts = [SYNTHESIZE.prompt(v, codec, t) for t in (TEXTS[0], TEXTS[1] + " " + TEXTS[2])]
    together = generate_image_codes(m, v, prompts, temperature=0.0)
    for i, p in enumerate(prompts):
        assert torch.equal(generate_image_codes(m, v, [p], temperature=0.0)[0], together[i])


def test_reports_contain_text_ids_only(small):
    m, v, codec = small["model"], small["vocab"], small["codec"]
    # Make image ids the most likely outputs: generation must still never emit them.
    with torch.no_grad():
        m.get_output_embeddings().weight[v.text_vocab_size:] *= 50
    try:
        prompts = [REPORT.prompt(v, codec, np.arange(16) % 32)] * 2
        for beams in (1, 3):
            out = generate_text(m, v, prompts, max_new_tokens=12, num_beams=beams)
            assert all(t < v.text_vocab_size for seq in out for t in seq)
    finally:
        with torch.no_grad():
            m.get_output_embeddings().weight[v.text_vocab_size:] /= 50


def _hf_only(monkeypatch):
    """Make the decoding functions take the Hugging Face path (what any non-Llama architecture gets)."""
    import mavilt.llm.generate as generate

    monkeypatch.setattr(generate.LlamaDecoder, "supports", staticmethod(lambda model: False))


@pytest.mark.parametrize("shape", [{}, {"num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True}])
def test_the_lean_decoder_gives_the_hugging_face_logits_at_every_step(shape):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mavilt.llm.decode import LlamaDecoder
    from mavilt.llm.generate import left_pad

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=64, **({"num_key_value_heads": 4} | shape))
    model = LlamaForCausalLM(cfg).eval()
    assert LlamaDecoder.supports(model)
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]  # left padding of 0, 3 and 2
    ids, mask = left_pad(prompts, 0)
    dec = LlamaDecoder(model, 3, ids.shape[1] + 2)
    hidden = dec.prefill(ids, mask)
    seq, m = ids, mask
    for new in ([13, 14, 15], [16, 17, 18], None):
        with torch.no_grad():
            ref = model(input_ids=seq, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
        assert torch.allclose(dec.logits(hidden, 0, 50), ref, atol=1e-5)
        assert torch.allclose(dec.logits(hidden, 20, 30), ref[:, 20:30], atol=1e-5)  # only the ids asked for
        if new is None:
            break
        t = torch.tensor(new)
        hidden = dec.step(t)
        seq, m = torch.cat([seq, t[:, None]], 1), torch.cat([m, torch.ones(3, 1, dtype=m.dtype)], 1)
    with pytest.raises(ValueError, match="capacity"):
        dec.step(torch.tensor([1, 2, 3]))


def test_the_lean_decoder_sees_weights_changed_in_place():
    """Its fused weights are built once per model, and again after a training step changed any weight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mavilt.llm.decode import LlamaDecoder

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, max_position_embeddings=64)).eval()
    ids, mask = torch.tensor([[3, 4, 5]]), torch.ones(1, 3, dtype=torch.long)

    def lean_and_hf():
        dec = LlamaDecoder(model, 1, 4)
        with torch.no_grad():
            return dec.logits(dec.prefill(ids, mask), 0, 50), model(input_ids=ids, attention_mask=mask).logits[:, -1], dec

    before, _, first = lean_and_hf()
    assert LlamaDecoder(model, 1, 4).layers is first.layers  # built once
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(3)
        model.model.layers[0].self_attn.k_proj.weight.add_(0.05)
    after, ref, _ = lean_and_hf()
    assert torch.allclose(after, ref, atol=1e-5) and not torch.allclose(after, before, atol=1e-3)


def test_the_lean_decoder_declines_what_it_does_not_know(small):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from mavilt.llm.decode import LlamaDecoder

    assert not LlamaDecoder.supports(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40)))
    lora = get_peft_model(build_tiny_lm(small["cfg"].llm, small["tok"]), LoraConfig(r=2, target_modules=["q_proj"]))
    assert not LlamaDecoder.supports(lora)


def test_lean_and_hugging_face_decoding_choose_the_same_ids(small, monkeypatch):
    m, v, codec = small["model"], small["vocab"], small["codec"]
    prompts = [SYNTHESIZE.prompt(v, codec, t) for t in (TEXTS[0], TEXTS[1] + " " + TEXTS[2], TEXTS[3])]
    unc = [SYNTHESIZE.prompt(v, codec, None)] * 3
    reports = [REPORT.prompt(v, codec, np.arange(16) % 32), REPORT.prompt(v, codec, (np.arange(16) * 7) % 32)]
    settings = ({"temperature": 0.0}, {"temperature": 1.0, "top_k": 5, "cfg_scale": 3.0, "uncond_prompts": unc})
    lean = [generate_image_codes(m, v, prompts, seed=4, **kw) for kw in settings]
    lean_text = generate_text(m, v, reports, max_new_tokens=12)
    _hf_only(monkeypatch)
    for got, kw in zip(lean, settings):
        assert torch.equal(got, generate_image_codes(m, v, prompts, seed=4, **kw))
    assert lean_text == generate_text(m, v, reports, max_new_tokens=12)
    assert all(len(x) > 0 for x in lean_text)


def test_contrastive_choice_promotes_what_the_image_adds_among_plausible_tokens():
    # Token 0 is the language prior (likely with any image), token 1 is likely only with this image, token 2 is
    # far likelier with this image than without but implausible (below the plausibility fraction of the best).
    p = torch.tensor([[0.55, 0.40, 0.05 * CONTRAST_PLAUSIBILITY, 0.05 - 0.05 * CONTRAST_PLAUSIBILITY]])
    q = torch.tensor([[0.55, 0.05, 1e-6, 0.40 - 1e-6]])
    logits, contrast = p.log(), q.log()
    assert logits.argmax(-1).item() == 0
    assert contrastive_choice(logits, contrast, 0.0).item() == 0  # no contrast: greedy
    assert contrastive_choice(logits, contrast, 1.0).item() == 1
    assert contrastive_choice(logits, contrast, 100.0).item() == 1  # token 2 never, however strong the contrast
    assert contrastive_choice(logits + 3.0, contrast - 2.0, 1.0).item() == 1  # logits, not probabilities, in


def test_contrastive_reports_against_the_same_prompt_are_greedy_and_do_not_depend_on_the_batch(small):
    m, v, codec = small["model"], small["vocab"], small["codec"]
    reports = [REPORT.prompt(v, codec, np.arange(16) % 32), REPORT.prompt(v, codec, (np.arange(16) * 7) % 32)]
    noise = [REPORT.prompt(v, codec, (np.arange(16) * 5 + 3) % 32)] * 2
    greedy = generate_text(m, v, reports, max_new_tokens=12)
    # log p - log q = 0 for every token: the plausible argmax is the greedy one.
    assert generate_text(m, v, reports, max_new_tokens=12, contrast_prompts=reports, contrast=2.0) == greedy
    contrasted = generate_text(m, v, reports, max_new_tokens=12, contrast_prompts=noise, contrast=2.0)
    assert all(len(x) > 0 and all(t < v.text_vocab_size for t in x) for x in contrasted)
    # The first token by hand: the contrastive choice on the two prompts' next-token logits over the text ids.
    with torch.no_grad():
        last = lambda p: m(input_ids=torch.tensor([p])).logits[0, -1, : v.text_vocab_size]  # noqa: E731
        first = [contrastive_choice(last(p)[None], last(q)[None], 2.0).item() for p, q in zip(reports, noise)]
    assert [x[0] for x in contrasted] == first
    # K draws average log q: two copies of the same draw are that draw; two different draws are their mean.
    assert generate_text(m, v, reports, max_new_tokens=12, contrast_prompts=noise * 2, contrast=2.0) == contrasted
    other = [REPORT.prompt(v, codec, (np.arange(16) * 3 + 1) % 32)] * 2
    with torch.no_grad():
        mixed = contrastive_choice(last(reports[0])[None], torch.stack([last(noise[0])[None], last(other[0])[None]]), 2.0)
        mean_q = torch.stack([last(noise[0]), last(other[0])]).log_softmax(-1).mean(0)[None]
    assert mixed.item() == contrastive_choice(last(reports[0])[None], mean_q, 2.0).item()  # log_softmax(mean log q) = mean log q + c
    two = generate_text(m, v, reports, max_new_tokens=12, contrast_prompts=[*noise, *other], contrast=2.0)
    assert [x[0] for x in two][0] == mixed.item()
    strong = generate_text(m, v, reports, max_new_tokens=12, contrast_prompts=noise, contrast=50.0)
    assert strong != greedy  # a strong contrast changes what is written
    assert generate_text(m, v, reports[1:], max_new_tokens=12, contrast_prompts=noise[1:], contrast=2.0) == contrasted[1:]
    with pytest.raises(ConfigError, match="greedy decoding .* generate.num_beams=1"):
        generate_text(m, v, reports, max_new_tokens=4, num_beams=2, contrast_prompts=noise, contrast=1.0)
    with pytest.raises(ValueError, match="K >= 1 contrast prompts of the same length per prompt"):
        generate_text(m, v, reports, max_new_tokens=4, contrast_prompts=noise[:1], contrast=1.0)
    for bad in ("-1", ".inf", ".nan"):
        with pytest.raises(ConfigError, match="generate.image_contrast must be a finite number >= 0"):
            load_config("micro", [f"generate.image_contrast={bad}"])
    # A greedy-decoding setting: with beam search asked for, the config is valid and the bundle decodes without it.
    assert load_config("micro", ["generate.image_contrast=1", "generate.num_beams=3"]).generate.num_beams == 3


def test_closed_vqa_probabilities_sum_to_one(small):
    m, v, codec = small["model"], small["vocab"], small["codec"]
    prompts = [VQA.prompt(v, codec, np.arange(16) % 32, "Which side?")] * 2
    probs = answer_probabilities(m, v, codec, prompts, [["left", "right", "bilateral"], ["yes", "no"]])
    assert [len(p) for p in probs] == [3, 2]
    assert all(abs(p.sum() - 1) < 1e-9 and (p > 0).all() for p in probs)


def test_nucleus_sampling_keeps_the_top_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = torch.rand(200, generator=torch.Generator().manual_seed(0))
    seen = {int(sample_logits(logits, temperature=1.0, top_k=0, top_p=0.7, uniform=u.view(1))) for u in draws}
    assert seen == {0, 1}
    assert int(sample_logits(logits, temperature=0.0, top_k=0, top_p=1.0, uniform=None)) == 0
    # The draws are inverted through each row's CDF: evenly spread draws give the kept mass's proportions
    # (0.5 and 0.3 renormalised), and a draw of 0 never picks an id the nucleus dropped.
    grid = (torch.arange(1000) + 0.5) / 1000
    picks = sample_logits(logits.expand(1000, 4), temperature=1.0, top_k=0, top_p=0.7, uniform=grid)
    assert float((picks == 0).float().mean()) == pytest.approx(0.5 / 0.8, abs=0.002)
    masked = torch.tensor([[float("-inf"), 0.0, 0.0]])
    assert int(sample_logits(masked, temperature=1.0, top_k=0, top_p=1.0, uniform=torch.zeros(1))) == 1


def test_codes_attach_by_image_id_and_an_image_without_codes_names_the_fix():
    import pyarrow as pa

    from mavilt.errors import DatasetError
    from mavilt.train.codes import attach_codes

    table = pa.table({"image_id": ["b", "a"], "findings": ["x", "y"]})
    codes = {"a": np.array([1, 2], np.int16), "b": np.array([3, 4], np.int16)}
    assert attach_codes(table, codes).column("codes").to_pylist() == [[3, 4], [1, 2]]
    with pytest.raises(DatasetError, match="1 images have no codes.*first: b.*delete the dataset's codes/ folder"):
        attach_codes(table, {"a": codes["a"]})


def test_a_sweep_trials_validation_is_a_fixed_subset_of_studies_without_the_image_gain_groups(small):
    from mavilt.data.shards import first_studies
    from mavilt.llm.data import HELDOUT, SHUFFLED, LLMData
    from mavilt.llm.stages import get_stage

    # Two images per study: the subset keeps whole studies, the first ones by study id, whatever the order.
    rows = [{**row(), "study_id": f"s{i // 2:02d}", "image_id": f"i{i:02d}"} for i in range(20)][::-1]
    kept = first_studies(rows, 3)
    assert sorted(r["image_id"] for r in kept) == [f"i{i:02d}" for i in range(6)]
    assert first_studies(rows, 100) == rows

    cfg = small["cfg"]
    stage = get_stage("stage2")

    def groups(**kw):
        data = LLMData(stage, cfg.stage2, 200, small["vocab"], small["codec"], rank=0, train_rows=rows,
                       val_rows=kept, heldout_rows=[{"text": TEXTS[0]}], agree_min=lambda n: n, **kw)
        first = data.validation_groups()
        assert data.validation_groups() is first  # built once per run
        return first

    full, trial = groups(), groups(image_gain=False)
    assert {"report", "synthesize", "vqa", HELDOUT} <= set(trial)
    assert set(full) - set(trial) == {f"report{SHUFFLED}", f"vqa{SHUFFLED}"}  # the image-conditioned tasks
    assert sum(len(b) for b in trial["report"]) == 6 * cfg.stage2.task_weights["report"]  # drawn from the kept images


# ---- the training step's scored head -----------------------------------------------------------------------


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_the_head_at_scored_positions_gives_the_same_loss_and_gradients(small, finetune):
    import contextlib

    from mavilt.train.llm_loop import ScoredHead, masked_lm_loss, scored_positions

    v = small["vocab"]
    batch = collate([task_example(small, t, row()) for t in ("report", "synthesize", "vqa")], v.pad_id)
    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    keep = scored_positions(labels)
    assert keep[:, :-1].eq(labels[:, 1:] != IGNORE).all() and not keep[:, -1].any()

    def loss_and_grads(scored: bool):
        torch.manual_seed(0)
        model = build_tiny_lm(small["cfg"].llm, small["tok"])
        extend_vocabulary(model, v, seed=0)
        if finetune == "lora":
            model = apply_finetune_mode(model, load_config("tiny", ["llm.finetune=lora"]).llm, v)
        head = ScoredHead(model)
        with head.scoring(labels) if scored else contextlib.nullcontext() as k:
            logits = model(input_ids=ids, attention_mask=attn).logits
        loss, per_task = masked_lm_loss(logits.float(), labels, batch["tasks"], k)
        loss.backward()
        return logits.shape, loss, per_task, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    shape, loss, per_task, grads = loss_and_grads(True)
    full_shape, full_loss, full_per_task, full_grads = loss_and_grads(False)
    assert shape == (int(keep.sum()), v.size) and full_shape == (*ids.shape, v.size)
    assert torch.equal(loss, full_loss) and per_task == full_per_task  # each token's loss computed alike
    assert grads.keys() == full_grads.keys()
    for n in grads:
        assert torch.allclose(grads[n], full_grads[n], atol=1e-6, rtol=1e-5), n
