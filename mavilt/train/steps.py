"""Driver side of every training step: check and resolve the inputs, build the Ray datasets, fit, hand off,
write the result.

Each ``run_*`` function is what one job file calls; ``jobs/pipeline.py`` calls the same functions. The step's
output directory is ``<storage>/<name>`` (Ray Train's run directory, holding the checkpoints), with
``config.yaml``, ``history.jsonl``, ``metrics.json`` and ``result.json`` beside them (:class:`StepOutput`).
Every path may be a local folder or a URI (:mod:`mavilt.storage`): the driver loads what it needs from local
copies, and hands the workers the paths as given, so each node makes its own copy.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mavilt.checkpoints import (HF_TOKENIZER, EncoderCheckpoint, StageCheckpoint, TextLMCheckpoint, Theta0Files,
                                VQGANCheckpoint)
from mavilt.config import Config
from mavilt.errors import ConfigError
from mavilt.hashing import config_hash
from mavilt.llm.stages import PRETRAIN_TEXT, get_stage
from mavilt.paths import iu_reports_dir
from mavilt.runs import StepOutput, finish
from mavilt.storage import Location, local_dir, publish_dir
from mavilt.train.inputs import EncoderInputs, LLMInputs, VQGANInputs
from mavilt.train.trainer import FitOutcome, fit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepHooks:
    """What a sweep's trial adds to a step run (:mod:`mavilt.sweeps`); a job runs with the defaults."""

    callbacks: tuple = ()  # Ray Train callbacks, e.g. Tune's TuneReportCallback
    wandb: bool = True  # workers log to wandb themselves (a sweep's Tuner logs its trials instead)
    judge_dir: str | None = None  # VQ-GAN: score reconstructions by this second encoder (checkpoints kept by it)
    judge_observations: tuple[str, ...] = ()
    theta0_dir: str | None = None  # stage 1: a theta_0 built once and shared (default: the run folder's own)
    report_f1_studies: int = 0  # LLM stages: clinical F1 of generated validation reports at the last report
    val_studies: int = 0  # LLM stages: validation losses over this many fixed studies (0: all)
    image_gain: bool = True  # LLM stages: the image-gain diagnostic in every validation
    # The step's Ray datasets, built once by a sweep's driver for all its trials (default: the step builds them):
    # decoding the VQ-GAN's images alone took about 30 s per trial.
    datasets: dict[str, Any] | None = None


def _prepare_out(storage: str | Path | Location, name: str, cfg: Config, data: str | Path | None = None) -> StepOutput:
    """Check the dataset a user gives before anything slow starts, connect to Ray (before Ray Data would start
    a default instance of its own), then make the output folder."""
    from mavilt.raycluster import ensure_ray

    if data is not None:
        from mavilt.data.shards import check_dataset

        check_dataset(data)
    ensure_ray()
    out = StepOutput(Location.of(storage) / name)
    out.root.mkdir()
    cfg.save(out.config)
    return out


def _numeric(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "done"}


def _best_metrics(outcome: FitOutcome) -> dict[str, Any]:
    return {"best_step": outcome.best_metrics.get("step"), **_numeric(outcome.best_metrics)}


# ---- encoder ------------------------------------------------------------------------------------------


def run_encoder(cfg: Config, data: str | Path, storage: str | Path, name: str = "encoder",
                hooks: StepHooks = StepHooks()) -> dict[str, Any]:
    from mavilt.data.raydata import vision_datasets
    from mavilt.train.vision import encoder_loop

    out = _prepare_out(storage, name, cfg, data)
    outcome = fit(encoder_loop, EncoderInputs(cfg, str(out.root), hooks.wandb), storage=out.root.parent, name=name,
                  score=("val_auroc_mean", "max"), datasets=vision_datasets(data))
    return finish("encoder", out.root, outcome.best_checkpoint, _best_metrics(outcome),
                  config_hash([cfg.to_dict()["encoder"], str(data)]))


def judge_config(cfg: Config, max_steps: int | None = None) -> Config:
    """The judge's config: phi's architecture and data, its own seed (``tune.judge_seed``), so it is trained
    independently of phi and only ever scores (reconstructions in sweeps; synthesised images in evaluation).
    Its own config names phi's seed as its judge's, so it passes the check that the two differ."""
    over = [f"encoder.seed={cfg.tune.judge_seed}", f"tune.judge_seed={cfg.encoder.seed}"]
    if max_steps:
        over.append(f"encoder.max_steps={max_steps}")
    return cfg.with_overrides(over, source="the judge")


# ---- VQ-GAN -------------------------------------------------------------------------------------------


def run_vqgan(cfg: Config, data: str | Path, storage: str | Path, name: str = "vqgan",
              encoder_checkpoint: str | Path | None = None, hooks: StepHooks = StepHooks()) -> dict[str, Any]:
    """Train the VQ-GAN. Its checkpoints are kept by a score that does not grow with the lambdas: the validation
    L1, or with a judge (sweeps) the tokenizer objective."""
    from mavilt.data.raydata import vision_datasets
    from mavilt.train.vision import vqgan_loop

    from mavilt.data.shards import check_dataset

    check_dataset(data)
    vc = cfg.vqgan
    phi_dir = None
    if vc.feature_encoder == "inhouse" and (vc.lambda_feat > 0 or vc.lambda_perceptual > 0 or encoder_checkpoint):
        if encoder_checkpoint is None:
            raise ConfigError("vqgan.feature_encoder=inhouse needs --encoder-checkpoint (train one with jobs/encoder.py), "
                              "or set vqgan.lambda_feat=0 and vqgan.lambda_perceptual=0")
        phi_dir = EncoderCheckpoint.find_model(encoder_checkpoint, "--encoder-checkpoint")
    out = _prepare_out(storage, name, cfg)
    inputs = VQGANInputs(cfg, str(out.root), hooks.wandb, str(phi_dir) if phi_dir else None, hooks.judge_dir,
                         hooks.judge_observations)
    score = (f"val_{'tokenizer_objective' if hooks.judge_dir else 'l1'}", "min")
    outcome = fit(vqgan_loop, inputs, storage=out.root.parent, name=name, score=score,
                  datasets=hooks.datasets or vision_datasets(data),
                  callbacks=list(hooks.callbacks))
    if outcome.best_checkpoint is not None and phi_dir is not None:
        # The VQ-GAN checkpoint carries its phi, so later steps (bundle, FID) find it without another argument.
        target = VQGANCheckpoint(outcome.best_checkpoint).phi
        if not target.exists():
            target.upload(local_dir(phi_dir))
    return finish("vqgan", out.root, outcome.best_checkpoint, _best_metrics(outcome),
                  config_hash([cfg.to_dict()["vqgan"], cfg.data.image_size, str(data), str(phi_dir) if phi_dir else None]))


# ---- the LLM stages -------------------------------------------------------------------------------------


def _check_theta0_base(theta0: Theta0Files, model_dir: Location, name: str) -> None:
    """theta_0 is fixed once per run folder: a run resumed with another starting LM would regularize toward
    the wrong weights (and resume another model's checkpoints)."""
    import json

    if theta0.exists():
        base = json.loads(theta0.spec.read_text()).get("base")
        if base != model_dir.uri:
            raise ConfigError(f"run '{name}' was started from {base}, not {model_dir}: use another --name (or "
                              "delete the run folder) to start from a different LM")


def _heldout_corpus(cfg: Config, data: str | Path, iu_dir: str | Path | None) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): every LLM stage scores perplexity on the same held-out part."""
    from mavilt.llm.textdata import pretraining_corpus

    pt = cfg.pretrain_text
    return pretraining_corpus(data, iu_dir or iu_reports_dir(), pt.heldout_fraction, pt.seed)


def llm_stage_datasets(cfg: Config, data: str | Path, cache: Any, iu_dir: str | Path | None = None) -> dict[str, Any]:
    """An image stage's Ray datasets: its rows with their cached codes, and the held-out text."""
    from mavilt.train.codes import stage_datasets

    return stage_datasets(data, cache, _heldout_corpus(cfg, data, iu_dir)[1])


def run_pretrain_text(cfg: Config, data: str | Path, storage: str | Path, name: str = PRETRAIN_TEXT.name,
                      iu_dir: str | Path | None = None) -> dict[str, Any]:
    """Train the tiny LM's BPE tokenizer and pretrain it on text; for a real LM (llm.base = a path) only
    record where it is (there is nothing to pretrain)."""
    job = PRETRAIN_TEXT.name
    from mavilt.llm.textdata import train_bpe_tokenizer
    from mavilt.train.codes import text_datasets
    from mavilt.train.llm_loop import llm_loop

    out = _prepare_out(storage, name, cfg, data)
    tc = cfg.pretrain_text
    train_texts, heldout = _heldout_corpus(cfg, data, iu_dir)
    corpus = {"train_documents": len(train_texts), "heldout_documents": len(heldout)}
    h = config_hash([cfg.to_dict()["llm"], cfg.to_dict()[job], str(data), corpus])
    if cfg.llm.base != "tiny":
        reason = f"llm.base is a pretrained LM ({cfg.llm.base}): it needs no text pretraining; stage 1 starts from it"
        log.info("%s: not needed, %s", job, reason)
        return finish(job, out.root, None, {**corpus, "base": cfg.llm.base, "skipped": 1, "not_needed": reason}, h)
    if tc.max_steps <= 0:
        raise ConfigError("the tiny LM must be pretrained: set pretrain_text.max_steps > 0")
    if not (out.text_tokenizer / HF_TOKENIZER).is_file():  # written last: a tokenizer with it is whole
        with tempfile.TemporaryDirectory(prefix="mavilt-tokenizer-") as tmp:
            train_bpe_tokenizer(train_texts, cfg.llm.text_vocab_size, tmp)
            publish_dir(tmp, out.text_tokenizer, HF_TOKENIZER)
    inputs = LLMInputs(cfg, str(out.root), stage=job, tokenizer_dir=str(out.text_tokenizer))
    outcome = fit(llm_loop, inputs, storage=out.root.parent, name=name, score=("val_loss", "min"),
                  datasets=text_datasets(train_texts, heldout), split=())
    return finish(job, out.root, outcome.best_checkpoint, {**corpus, **_best_metrics(outcome)}, h)


def run_stage(stage_name: str, cfg: Config, data: str | Path, tokenizer_checkpoint: str | Path,
              init_checkpoint: str | Path, storage: str | Path, name: str | None = None,
              encoder_checkpoint: str | Path | None = None, iu_dir: str | Path | None = None,
              hooks: StepHooks = StepHooks()) -> dict[str, Any]:
    """Stage 1 (from a pretrained LM) or stage 2 (from a stage-1 checkpoint); stage 2 writes a model bundle."""
    from mavilt.llm.checkpoint import read_vocab
    from mavilt.tokenizer.model import VQGAN
    from mavilt.train.codes import CodeCache
    from mavilt.train.llm_loop import llm_loop

    stage = get_stage(stage_name)
    if not stage.uses_images:
        raise ConfigError(f"{stage_name} is not an image stage; run it with jobs/{stage_name}.py")
    name = name or stage.name
    # Every user-given path is checked before anything slow starts.
    vqgan_dir = VQGANCheckpoint.find_model(tokenizer_checkpoint, "--tokenizer-checkpoint")
    if stage.starts_from == "pretrained_lm":
        model_dir, tok_dir = TextLMCheckpoint.find_lm(init_checkpoint)
        init = None
    else:
        init = StageCheckpoint.find(init_checkpoint)
        tok_dir = init.tokenizer
    encoder_dir = None
    if stage.writes_bundle:
        encoder_dir = (EncoderCheckpoint.find_model(encoder_checkpoint, "--encoder-checkpoint") if encoder_checkpoint
                       else VQGANCheckpoint.phi_beside(vqgan_dir))
    out = _prepare_out(storage, name, cfg, data)

    vq = VQGAN.from_pretrained(local_dir(vqgan_dir))
    k, n = vq.codebook_size, vq.num_tokens(cfg.data.image_size)
    cache = CodeCache(data, vqgan_dir)
    cache.build()

    if stage.stores_theta0:
        theta0 = ensure_theta0(Theta0Files(hooks.theta0_dir or out.theta0), cfg, stage.name, model_dir, tok_dir, k, n, name)
    else:
        vocab = read_vocab(init)
        if (vocab.codebook_size, vocab.tokens_per_image) != (k, n):
            raise ConfigError(f"stage-1 checkpoint {init.root} was trained with K={vocab.codebook_size}, "
                              f"N={vocab.tokens_per_image} but the tokenizer checkpoint gives K={k}, N={n}: pass the "
                              "VQ-GAN stage 1 used")
        theta0 = init.theta0
    inputs = LLMInputs(cfg, str(out.root), hooks.wandb, stage=stage.name, tokenizer_dir=str(tok_dir),
                       theta0_dir=str(theta0.root), init_checkpoint=str(init.root) if init else None,
                       report_f1_studies=hooks.report_f1_studies, val_studies=hooks.val_studies,
                       image_gain=hooks.image_gain)
    outcome = fit(llm_loop, inputs, storage=out.root.parent, name=name, score=("val_loss", "min"),
                  datasets=hooks.datasets or llm_stage_datasets(cfg, data, cache, iu_dir), split=(),
                  callbacks=list(hooks.callbacks))
    metrics = {**_best_metrics(outcome), "final": _numeric(outcome.metrics)}
    checkpoint = outcome.best_checkpoint
    h = config_hash([cfg.to_dict()["llm"], cfg.to_dict()[stage.name], str(data), str(tokenizer_checkpoint),
                     str(init_checkpoint)])
    if stage.writes_bundle and checkpoint is not None:
        from mavilt.bundle import write_bundle

        checkpoint = write_bundle(out.bundle, StageCheckpoint(checkpoint), vqgan_dir, encoder_dir, cfg)
    return finish(stage.name, out.root, checkpoint, metrics, h)


def ensure_theta0(theta0: Theta0Files, cfg: Config, stage_name: str, model_dir: Location, tok_dir: Location, k: int,
                  n: int, run_name: str) -> Theta0Files:
    """theta_0 at ``theta0``, built once (the LM as loaded, its vocabulary extended by K codes and the special
    tokens at their initial values) and published by its spec file; a run or sweep reuses it after that."""
    from mavilt.llm.checkpoint import load_tokenizer
    from mavilt.llm.model import extend_vocabulary, load_lm, save_theta0
    from mavilt.llm.vocab import JointVocab

    _check_theta0_base(theta0, model_dir, run_name)
    if not theta0.exists():
        vocab = JointVocab.for_tokenizer(load_tokenizer(local_dir(tok_dir)), k, n)
        model, _ = load_lm(local_dir(model_dir), cfg.llm.dtype, with_tokenizer=False)
        extend_vocabulary(model, vocab, seed=cfg.section(stage_name).seed)
        with tempfile.TemporaryDirectory(prefix="mavilt-theta0-") as tmp:
            save_theta0(Theta0Files(tmp), model_dir, model, vocab)
            publish_dir(tmp, theta0.root, Theta0Files.SPEC)
    return theta0
