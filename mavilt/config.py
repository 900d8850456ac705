"""Typed configuration for every MAViLT stage.

A config is a tree of dataclasses whose fields carry their help text. Presets live in ``mavilt/configs``
(the checkout's ``configs/``) and are partial trees: anything they leave out keeps the dataclass default.
Jobs apply ``--set section.key=value`` overrides on top (values are parsed as YAML, then checked against the
field's type); :meth:`Config.with_overrides` does the same for a config already built. Unknown keys and wrong
types raise :class:`ConfigError` with one message naming the key, its type and its help. The resolved config
is saved beside every output (``config.yaml``) and inside every checkpoint; configs saved by older code are
migrated when they are read back (:func:`config_from_dict`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mavilt.config_migrate import migrate
from mavilt.errors import ConfigError
from mavilt.hashing import config_hash
from mavilt.paths import CONFIG_DIR

if typing.TYPE_CHECKING:
    from mavilt.storage import Location

log = logging.getLogger(__name__)

__all__ = ["Config", "ConfigError", "load_config", "config_from_dict", "parse_overrides", "valid_keys",
           "list_presets", "add_config_args", "CONFIG_VERSION"]

# 2: each LLM stage offers only the settings it uses; no tune/serve sections until they configure something.
# 3: the tune (sweeps) and tracking (metrics to wandb) sections; later, the serve section (new, all defaults,
# so version-3 configs without it read unchanged).
CONFIG_VERSION = 3

Section = Literal["findings", "impression", "both"]


_UNSET = object()


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
            neutral: Any = _UNSET) -> Any:
    """A config field with its help text (shown in errors and by ``--help``-like listings). ``neutral``: for a
    field added after runs were made, the value at which it changes nothing; :meth:`Config.hash` leaves the field
    out at that value, so the finished steps of earlier runs keep their hash and are not made again."""
    metadata = {"help": help, **({"neutral": neutral} if neutral is not _UNSET else {})}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    """How shards are prepared (image size, bit depth) and how the synthetic set is drawn."""

    image_size: int = setting(64, "side of the square images written to the shards, in pixels (8-1024)")
    bit_depth: Literal[8, 16] = setting(8, "PNG bit depth of the shards")
    num_samples: int = setting(2000, "synthetic source only: how many phantom images to draw")
    seed: int = setting(0, "seed of the synthetic source and of the sources' split assignment")
    split_fractions: list[float] = setting(help="train, validate, test fractions (sources without a split file)",
                                           factory=lambda: [0.8, 0.1, 0.1])
    rows_per_file: int = setting(1000, "rows per Parquet file")
    # Small batches keep memory flat with big DICOMs.
    batch_size: int = setting(16, "records per Ray Data conversion batch")


@dataclass
class ComputeConfig:
    """Ray Train scaling shared by all training steps."""

    num_workers: int = setting(1, "Ray Train workers")
    use_gpu: bool = setting(False, "train on GPUs (NCCL) instead of CPUs (gloo)")
    # Fractional CPUs leave Ray Data a CPU of its own on small machines (see REFERENCE.md).
    cpus_per_worker: float = setting(1.0, "CPUs each train worker reserves (fractions allowed)")
    gpus_per_worker: float = setting(1.0, "GPUs each train worker reserves when use_gpu (fractions allowed)")
    torch_threads: int = setting(1, "torch.set_num_threads inside each worker")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = setting(
        "PACK", "how the workers' placement group spreads over nodes (STRICT_SPREAD: one worker per node)")
    max_failures: int = setting(0, "Ray Train FailureConfig(max_failures): restarts from the last checkpoint "
                                   "after a worker dies (-1: always)")
    keep_checkpoints: int = setting(2, "checkpoints kept per run, best by the step's validation score")


@dataclass
class EncoderConfig:
    """The in-house CXR encoder (phi): a CheXpert multi-label classifier reused for FID and label fidelity."""

    width: int = setting(32, "channels of the first stage (doubling per stage)")
    depth: int = setting(4, "downsampling stages; feature dim = width * 2**(depth-1)")
    lr: float = setting(2e-3, "peak learning rate (one-cycle schedule)")
    weight_decay: float = setting(1e-4, "AdamW weight decay")
    batch_size: int = setting(64, "images per step per worker")
    max_steps: int = setting(600, "training steps")
    eval_every: int = setting(100, "steps between validation passes (and checkpoints)")
    log_every: int = setting(25, "steps between progress lines and history/wandb records (Ray gets the validation reports)")
    seed: int = setting(0, "seed of weights, augmentation and data order")
    augment: bool = setting(True, "small shifts and contrast jitter (no flips: laterality matters)")


@dataclass
class VQGANConfig:
    """The image tokenizer and its composite loss."""

    downsample: int = setting(8, "f: tokens per image = (image_size / f) ** 2")
    channels: int = setting(64, "base channels of encoder and decoder")
    channel_mult: list[int] = setting(help="per-resolution channel multipliers; n entries halve the size n-1 times "
                                           "(2**(n-1) == downsample)", factory=lambda: [1, 2, 2, 4])
    num_res_blocks: int = setting(1, "ResNet blocks per resolution")
    mid_block: bool = setting(True, "two ResNet blocks at the lowest resolution (encoder and decoder)")
    codebook_size: int = setting(256, "K: codes in the codebook (image ids in the LLM vocabulary)")
    code_dim: int = setting(32, "dimension of each code vector")
    codebook_decay: float = setting(0.95, "EMA decay of the codebook")
    commitment_weight: float = setting(0.25, "weight of the commitment loss")
    dead_code_threshold: float = setting(1.0, "codes used fewer times per batch than this are restarted")
    use_cosine_sim: bool = setting(False, "l2-normalised codes and inputs (cosine distance) instead of Euclidean")
    kmeans_init: bool = setting(False, "initialise the codebook by k-means on the first training batch")
    lambda_l1: float = setting(1.0, "weight of the L1 reconstruction term")
    lambda_grad: float = setting(1.0, "weight of the Sobel image-gradient term (keeps lesion edges)")
    lambda_feat: float = setting(0.1, "weight of the CXR-encoder feature term")
    lambda_perceptual: float = setting(0.0, "weight of the perceptual term on the encoder's intermediate maps")
    lambda_adv: float = setting(0.1, "weight of the adversarial term (adaptive, after disc_start)")
    disc_start: int = setting(100000, "step at which the adversarial term switches on")
    disc_channels: int = setting(32, "discriminator base channels")
    disc_layers: int = setting(2, "discriminator downsampling layers")
    feature_encoder: str = setting("inhouse", "phi for the feature term: inhouse | xrv | module:<import.path>:<attr>")
    feature_weights: str | None = setting(None, "weights file for xrv / module encoders")
    lr: float = setting(1e-3, "generator learning rate (cosine decay to 10%)")
    disc_lr: float = setting(2e-4, "discriminator learning rate")
    batch_size: int = setting(32, "images per step per worker")
    max_steps: int = setting(1500, "training steps")
    eval_every: int = setting(250, "steps between validation passes (and checkpoints)")
    log_every: int = setting(50, "steps between progress lines and history/wandb records (Ray gets the validation reports)")
    seed: int = setting(0, "seed of weights and data order")


@dataclass
class LLMConfig:
    """The causal LM whose vocabulary is extended with image codes."""

    base: str = setting("tiny", "'tiny' builds a small Llama from the fields below; else a local HF model "
                                "folder (or a hub name where a hub is reachable)")
    hidden_size: int = setting(256, "tiny LM: hidden size")
    num_layers: int = setting(4, "tiny LM: decoder layers")
    num_heads: int = setting(4, "tiny LM: attention heads")
    intermediate_size: int = setting(688, "tiny LM: MLP width")
    max_length: int = setting(256, "longest training sequence in tokens (prompt + response)")
    text_vocab_size: int = setting(3000, "tiny LM: BPE vocabulary trained by jobs/pretrain_text.py")
    finetune: Literal["full", "lora"] = setting("full", "stage 1 and 2: train every weight, or LoRA adapters "
                                                        "plus the new embedding rows")
    lora_r: int = setting(16, "LoRA rank")
    lora_alpha: int = setting(32, "LoRA alpha")
    lora_dropout: float = setting(0.05, "LoRA dropout")
    lora_targets: list[str] = setting(
        help="module names LoRA adapts (those the model has)",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass (less memory)")
    dtype: Literal["float32", "bfloat16"] = setting("float32", "weights dtype when loading a HF model")


@dataclass
class LLMTrainConfig:
    """What every LLM training run shares (text pretraining, stage 1, stage 2): the same loop runs all three."""

    lr: float = setting(1e-3, "peak learning rate (linear warm-up, cosine decay to 10%)")
    weight_decay: float = setting(0.01, "AdamW weight decay (not on norms, biases, embeddings)")
    warmup_steps: int = setting(50, "linear warm-up steps")
    grad_clip: float = setting(1.0, "gradient norm clip (0: off)")
    batch_size: int = setting(16, "sequences per step per worker")
    max_steps: int = setting(1000, "training steps")
    eval_every: int = setting(200, "steps between validation passes (and checkpoints)")
    log_every: int = setting(20, "steps between progress lines and history/wandb records (Ray gets the validation reports)")
    strategy: Literal["ddp", "deepspeed"] = setting("ddp", "ddp (or one process), or DeepSpeed ZeRO")
    deepspeed_config: str = setting("configs/deepspeed/zero2.json", "DeepSpeed JSON (zero2.json or zero3.json)")
    seed: int = setting(0, "seed of weights, example draws and batch order")


@dataclass
class PretrainTextConfig(LLMTrainConfig):
    """Text pretraining of the tiny LM on report texts (skipped for a real pretrained LM)."""

    heldout_fraction: float = setting(0.05, "share of the report corpus held out; every LLM stage measures its "
                                            "perplexity on it (split by pretrain_text.seed)")


@dataclass
class StageConfig(LLMTrainConfig):
    """Stage 1 (image<->report alignment) or stage 2 (instruction tuning): tasks, regularizer, sections."""

    lambda_reg: float = setting(0.0, "weight of lambda_reg * ||theta - theta_0||^2 (keeps the LM's language)")
    task_weights: dict[str, float] = setting(help="relative sampling weight of each of the stage's tasks "
                                                  "(empty: all 1)", factory=dict)
    report_section: Section = setting("findings", "report section the report tasks read and write")
    condition_dropout: float = setting(0.1, "report->image tasks: probability of dropping the report, so "
                                            "classifier-free guidance can be used")
    report_subsets: float = setting(0.0, "report->image tasks: probability of conditioning on a random subset of the "
                                         "report's sentences (short prompts draw images too; 0: whole reports)")
    clinical_token_weight: float = setting(1.0, "loss weight of report tokens that name a finding, a negation or "
                                                "hedge, a side or a size (mavilt.llm.weighting; 1: unweighted)")
    image_token_weight: float = setting(1.0, "loss weight of image codes where an image is the response (1: unweighted)")


@dataclass
class GenerateConfig:
    """Decoding settings (evaluation, CLI); each may be overridden per call."""

    max_new_tokens: int = setting(96, "longest generated report in tokens")
    num_beams: int = setting(3, "beam width for reports (1: greedy or sampling)")
    do_sample: bool = setting(False, "nucleus/top-k sampling instead of greedy/beam for reports")
    temperature: float = setting(1.0, "report sampling temperature")
    top_p: float = setting(0.9, "nucleus sampling mass")
    top_k: int = setting(0, "sample among the k most likely ids (0: all)")
    cfg_scale: float = setting(1.0, "classifier-free guidance scale for report->image (1: off)")
    image_temperature: float = setting(1.0, "image code sampling temperature (0: greedy)")
    seed: int = setting(0, "sampling seed")
    rerank_candidates: int = setting(0, "reports: draw this many candidates (the greedy/beam one and sampled ones) "
                                        "and keep the one whose findings agree best with the bundle's CXR encoder "
                                        "(mavilt.eval.rerank; 0 or 1: off)")
    image_contrast: float = setting(0.0, "reports: visual contrastive decoding, greedy on (1+a) log p(token | image) "
                                         "- a log p(token | random image codes) among the tokens the image makes "
                                         "plausible; promotes what the image, not the language prior, says; greedy decoding of a "
                                         "Llama-style LM only (a call asking for beams or sampling decodes without "
                                         "it); the random codes are drawn with generate.seed (0: off)",
                                    neutral=0.0)
    image_contrast_draws: int = setting(1, "random code draws the contrast averages log q over (each adds a batch of "
                                           "rows to decoding)", neutral=1)


@dataclass
class EvalConfig:
    """`jobs/evaluate.py`: split, conventions, baselines and bootstrap settings."""

    split: Literal["train", "validate", "test"] = setting("test", "split to evaluate")
    limit: int | None = setting(None, "evaluate the first N images only (None: all)")
    batch_size: int = setting(32, "prediction batch size")
    report_section: Section = setting("findings", "reference section the reports are scored against")
    uncertain_policy: Literal["negative", "positive"] = setting("negative", "uncertain CheXpert labels count as")
    bootstrap_samples: int = setting(1000, "bootstrap replicates for F1, accuracy and ROUGE-L CIs")
    fid_network: str = setting("inhouse", "FID features: inhouse | xrv | inception")
    fid_weights: str | None = setting(None, "weights file for the xrv / inception FID networks")
    max_words: int | None = setting(100, "R2Gen: 60 (IU X-ray) / 100 (MIMIC-CXR) words per report for the metrics")
    nlg_bootstrap_samples: int = setting(200, "bootstrap replicates for corpus BLEU (recomputed per replicate)")
    synth_limit: int | None = setting(None, "studies to synthesise images for (None: all)")
    retrieval_pool: int = setting(4000, "training images the nearest-neighbour baseline searches")
    workers: int = setting(0, "Ray Data actors for generation; 0: auto (local on a CPU-only machine of <= 4 cores)")
    seed: int = setting(0, "seed of bootstraps, derangements and random codes")
    judge_steps: int = setting(0, "training steps of the main job's judge, the second CXR encoder (seed "
                                  "tune.judge_seed) that scores synthesised images (0: encoder.max_steps)")


@dataclass
class TuneConfig:
    """Sweeps (``tune/sweep_tokenizer.py``, ``tune/sweep_reg.py``): per-trial budgets, search ranges, early
    stopping, and the weights of the two objectives (see :mod:`mavilt.sweeps.objectives`)."""

    stage_steps: int = setting(900, "steps of each stage-sweep trial (its stage's max_steps)")
    stage_eval_every: int = setting(300, "steps between a stage trial's validations: its reports, ASHA's rungs")
    tokenizer_steps: int = setting(1000, "steps of each tokenizer-sweep trial (vqgan.max_steps)")
    tokenizer_eval_every: int = setting(250, "steps between a tokenizer trial's validations: its reports, ASHA's rungs")
    lambda_grad: list[float] = setting(help="[low, high] of vqgan.lambda_grad (log-uniform)", factory=lambda: [1.0, 300.0])
    lambda_feat: list[float] = setting(help="[low, high] of vqgan.lambda_feat (log-uniform)", factory=lambda: [0.01, 3.0])
    lambda_reg: list[float] = setting(help="[low, high] of the stage's lambda_reg (log-uniform)", factory=lambda: [1e-6, 1e-2])
    lr: list[float] = setting(help="[low, high] of the stage's learning rate (log-uniform)", factory=lambda: [3e-4, 3e-3])
    num_samples: int = setting(8, "trials per sweep (--num-samples overrides)")
    seed: int = setting(0, "seed of Optuna's TPE sampler")
    grace_steps: int = setting(0, "ASHA: steps before a trial may be stopped (0: one validation interval)")
    reduction_factor: float = setting(2.0, "ASHA: a trial goes on past a rung only if it is in the best 1/factor there")
    max_failures: int = setting(1, "retries of a failed trial (each resumes from its last checkpoint)")
    seed_reruns: int = setting(2, "the best and the preset's trials are run again with this many more seeds")
    edge_weight: float = setting(1.0, "tokenizer objective: weight of the edge error next to the judge's diagnosis drift")
    judge_seed: int = setting(1, "seed of the judge (a second CXR encoder, trained for scoring only); must differ from "
                                 "encoder.seed")
    judge_steps: int = setting(0, "steps the judge trains (0: encoder.max_steps, as long as phi)")
    judge_min_auroc: float = setting(0.7, "observations the judge reads: validation AUROC at least this")
    retention_weight: float = setting(1.0, "stage objective: weight of ln(held-out perplexity / the start's)")
    f1_weight: float = setting(1.0, "stage objective: weight of the clinical F1 of generated reports")
    f1_studies: int = setting(100, "stage objective: fixed validation studies whose generated reports are scored")
    val_studies: int = setting(0, "stage trials: fixed validation studies their validation losses are measured on "
                                  "(0: all); trials also skip the image-gain diagnostic")


@dataclass
class TrackingConfig:
    """Where metrics go besides ``history.jsonl``: wandb, offline unless configured."""

    wandb: bool = setting(False, "log every job's and every trial's metrics to wandb")
    mode: Literal["offline", "online"] = setting("offline", "offline: files under the run's folder (wandb sync later)")
    project: str = setting("mavilt", "wandb project")
    entity: str | None = setting(None, "wandb entity (team); None: the user's default")
    dir: str | None = setting(None, "local folder for wandb's files; None: <run folder>/wandb (a local cache "
                                    "folder when the run folder is on a store)")


@dataclass
class DeploymentConfig:
    """One Ray Serve deployment's resources and autoscaling (``serve.<name>``)."""

    num_cpus: float = setting(1.0, "CPUs each replica reserves (fractions allowed)")
    num_gpus: float = setting(0.0, "GPUs each replica reserves (fractions share a GPU)")
    min_replicas: int = setting(1, "fewest replicas (autoscaling never goes below)")
    max_replicas: int = setting(1, "most replicas (min = max: no autoscaling)")
    target_ongoing_requests: float = setting(2.0, "ongoing requests per replica the autoscaler aims at")
    upscale_delay_s: float = setting(30.0, "seconds of sustained load before a replica is added")
    downscale_delay_s: float = setting(600.0, "seconds of low load before a replica is removed")
    look_back_period_s: float = setting(30.0, "seconds of load the autoscaler averages over")


@dataclass
class ServeConfig:
    """``serve/app.py``: the HTTP API's limits, batching and each deployment's resources."""

    host: str = setting("127.0.0.1", "address the HTTP proxy binds (loopback unless you mean to expose it)")
    port: int = setting(8000, "HTTP port")
    api_key: str | None = setting(None, "when set (or MAVILT_API_KEY is), requests must send it in X-API-Key")
    max_upload_mb: float = setting(20.0, "largest image upload accepted (413 above it)")
    request_timeout_s: float = setting(120.0, "a request still unanswered after this gets 504")
    max_queued_requests: int = setting(64, "requests waiting per deployment beyond which new ones get 503")
    max_batch_size: int = setting(8, "requests one model call batches together (@serve.batch)")
    batch_wait_timeout_s: float = setting(0.05, "longest wait for a batch to fill")
    max_text_chars: int = setting(4000, "longest report text for /v1/synthesize")
    max_question_chars: int = setting(500, "longest question for /v1/vqa")
    max_new_tokens: int = setting(256, "largest max_new_tokens a request may ask for")
    max_beams: int = setting(8, "largest num_beams a request may ask for")
    max_images: int = setting(4, "most images one /v1/synthesize request may ask for")
    ingress: DeploymentConfig = setting(help="the FastAPI ingress", factory=lambda: DeploymentConfig(num_cpus=0.1))
    tokenizer: DeploymentConfig = setting(help="ImageTokenizer (VQ-GAN encoder)",
                                          factory=lambda: DeploymentConfig(num_cpus=0.2))
    llm: DeploymentConfig = setting(help="LLM (reports, image codes, VQA)", factory=lambda: DeploymentConfig(num_cpus=0.5))
    decoder: DeploymentConfig = setting(help="ImageDecoder (VQ-GAN decoder)",
                                        factory=lambda: DeploymentConfig(num_cpus=0.2))


@dataclass
class Config:
    preset: str = setting("tiny", "name of the preset (or YAML file) this config came from")
    data: DataConfig = setting(help="dataset preparation", factory=DataConfig)
    compute: ComputeConfig = setting(help="Ray Train scaling", factory=ComputeConfig)
    encoder: EncoderConfig = setting(help="the in-house CXR encoder phi", factory=EncoderConfig)
    vqgan: VQGANConfig = setting(help="the image tokenizer", factory=VQGANConfig)
    llm: LLMConfig = setting(help="the causal LM", factory=LLMConfig)
    pretrain_text: PretrainTextConfig = setting(help="text pretraining of the tiny LM", factory=PretrainTextConfig)
    stage1: StageConfig = setting(help="stage 1: image<->report alignment", factory=StageConfig)
    stage2: StageConfig = setting(help="stage 2: instruction tuning (report, synthesize, vqa)", factory=StageConfig)
    generate: GenerateConfig = setting(help="decoding", factory=GenerateConfig)
    eval: EvalConfig = setting(help="evaluation", factory=EvalConfig)
    tune: TuneConfig = setting(help="sweeps: budgets, ranges, early stopping, objectives", factory=TuneConfig)
    tracking: TrackingConfig = setting(help="metrics to wandb (offline unless configured)", factory=TrackingConfig)
    serve: ServeConfig = setting(help="serving: HTTP limits, batching, deployments' resources", factory=ServeConfig)

    # ---- conversions -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as plain data, with the version that :func:`config_from_dict` migrates from."""
        return {"config_version": CONFIG_VERSION, **dataclasses.asdict(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path) -> "Location":
        """Write the YAML to a local path or a URI (:class:`mavilt.storage.Location`)."""
        from mavilt.storage import Location

        return Location.of(path).write_text(self.to_yaml())

    def hash(self, *sections: str) -> str:
        """Stable hash of the whole config, or of the named sections only; a field at its ``neutral`` value (see
        :func:`setting`) is left out, as if it did not exist."""
        d = self.to_dict()
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                for g in dataclasses.fields(section):
                    if "neutral" in g.metadata and getattr(section, g.name) == g.metadata["neutral"]:
                        del d[f.name][g.name]
        return config_hash({s: d[s] for s in sections} if sections else d)

    def with_overrides(self, overrides: list[str] | dict[str, Any], source: str = "--set") -> "Config":
        """A copy with ``key=value`` strings (or a nested mapping) applied and checked; ``self`` is unchanged."""
        cfg = copy.deepcopy(self)
        _apply(cfg, parse_overrides(overrides) if isinstance(overrides, list) else overrides, "", source)
        _check(cfg)
        return cfg

    def section(self, name: str) -> Any:
        """A section by name (``cfg.section("stage2")``), with a clear error for an unknown one."""
        if name not in _section_names():
            raise ConfigError(f"no config section '{name}'; sections: {', '.join(_section_names())}")
        return getattr(self, name)


# ---- describing keys ---------------------------------------------------------------------------------


def _section_names() -> list[str]:
    hints = typing.get_type_hints(Config)
    return [f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])]


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def valid_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every settable key, dotted (``stage2.lambda_reg``, ``serve.llm.num_cpus``)."""
    keys = []
    for f, t in _fields(cls or Config):
        if dataclasses.is_dataclass(t):
            keys.extend(valid_keys(t, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def describe_key(key: str) -> str:
    """``stage2.lambda_reg (float): weight of ...`` for one dotted key."""
    cls: Any = Config
    parts = key.split(".")
    for i, p in enumerate(parts):
        found = {f.name: (f, t) for f, t in _fields(cls)}
        if p not in found:
            raise KeyError(key)
        f, t = found[p]
        if i < len(parts) - 1:
            cls = t
    return f"{key} ({_type_name(t)}): {f.metadata.get('help', '')}".rstrip(": ")


def _section_listing(cls: type, prefix: str) -> str:
    return "; ".join(describe_key(f"{prefix}{f.name}") for f, _ in _fields(cls))


def _unknown_key_error(dotted: str, cls: type, prefix: str, source: str) -> ConfigError:
    names = [f.name for f, _ in _fields(cls)]
    leaf = dotted.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, names, n=1)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    if cls is Config:
        listing = "sections: " + ", ".join(f"{n} ({f.metadata.get('help', '')})" for f, _ in _fields(Config)
                                           for n in [f.name])
    else:
        listing = f"valid keys of '{prefix[:-1]}': " + _section_listing(cls, prefix)
    return ConfigError(f"unknown config key '{dotted}' (from {source}).{hint} The {listing}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + "/".join(map(str, typing.get_args(tp)))
    if dataclasses.is_dataclass(tp):
        return "section"
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    return str(tp).replace("typing.", "")


# ---- validation and overrides -------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow int->float and YAML's string-read floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad() -> ConfigError:
        return ConfigError(
            f"config key '{key}' (from {source}) expects {_type_name(tp)}, got {value!r} "
            f"({type(value).__name__}): {describe_key(key)}"
        )

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except ConfigError:
                continue
        raise bad()
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"config key '{key}' (from {source}) must be one of {list(args)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [_coerce(v, args[0], key, source) for v in value] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        return {str(k): _coerce(v, args[1], key, source) for k, v in value.items()} if args else dict(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad()
        return str(value)
    if isinstance(value, tp):
        return value
    raise bad()


def _apply(obj: Any, data: dict[str, Any], prefix: str, source: str) -> None:
    fields = {f.name: t for f, t in _fields(type(obj))}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise _unknown_key_error(dotted, type(obj), prefix, source)
        tp = fields[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config section '{dotted}' (from {source}) must be a mapping, got {value!r}")
            _apply(getattr(obj, key), value, f"{dotted}.", source)
        else:
            setattr(obj, key, _coerce(value, tp, dotted, source))


def _check(cfg: Config) -> None:
    """Cross-field checks that a type alone cannot express."""
    from mavilt.llm.stages import STAGES, check_task_weights  # the stages own their task lists

    d, v = cfg.data, cfg.vqgan
    if d.image_size % v.downsample:
        raise ConfigError(f"data.image_size={d.image_size} must be a multiple of vqgan.downsample={v.downsample}")
    if 2 ** (len(v.channel_mult) - 1) != v.downsample:
        raise ConfigError(
            f"vqgan.channel_mult has {len(v.channel_mult)} entries, which gives a downsampling factor of "
            f"{2 ** (len(v.channel_mult) - 1)}; vqgan.downsample={v.downsample} needs "
            f"{v.downsample.bit_length()} entries"
        )
    fr = d.split_fractions
    if len(fr) != 3 or any(x < 0 for x in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ConfigError(f"data.split_fractions must be three non-negative numbers summing to 1, got {fr}")
    if not 8 <= d.image_size <= 1024:
        raise ConfigError(f"data.image_size must be between 8 and 1024, got {d.image_size}")
    t = cfg.tune
    for key in ("lambda_grad", "lambda_feat", "lambda_reg", "lr"):
        lo_hi = getattr(t, key)
        if len(lo_hi) != 2 or not 0 < lo_hi[0] < lo_hi[1]:
            raise ConfigError(f"tune.{key} must be [low, high] with 0 < low < high (a log-uniform range), got {lo_hi}")
    if t.judge_seed == cfg.encoder.seed:
        raise ConfigError(f"tune.judge_seed={t.judge_seed} equals encoder.seed: the judge must be trained "
                          "independently of phi; set another tune.judge_seed")
    for name in STAGES:
        section = cfg.section(name)
        if isinstance(section, StageConfig):
            check_task_weights(name, section.task_weights)
            if not 0 <= section.report_subsets <= 1:
                raise ConfigError(f"{name}.report_subsets must be a probability in [0, 1], got {section.report_subsets}")
            for key in ("clinical_token_weight", "image_token_weight"):
                if not getattr(section, key) > 0:
                    raise ConfigError(f"{name}.{key} must be > 0 (1: unweighted), got {getattr(section, key)}")
    g = cfg.generate
    if not (math.isfinite(g.image_contrast) and g.image_contrast >= 0):
        raise ConfigError(f"generate.image_contrast must be a finite number >= 0 (0: off), got {g.image_contrast}")
    if g.image_contrast_draws < 1:
        raise ConfigError(f"generate.image_contrast_draws must be >= 1, got {g.image_contrast_draws}")
    _check_serve(cfg.serve)


def _check_serve(sv: ServeConfig) -> None:
    for key in ("max_batch_size", "max_queued_requests", "max_text_chars", "max_question_chars", "max_new_tokens",
                "max_beams", "max_images"):
        if getattr(sv, key) < 1:
            raise ConfigError(f"serve.{key} must be >= 1, got {getattr(sv, key)}")
    for key in ("max_upload_mb", "request_timeout_s"):
        if not getattr(sv, key) > 0:
            raise ConfigError(f"serve.{key} must be > 0, got {getattr(sv, key)}")
    if not 0 <= sv.batch_wait_timeout_s <= 10:
        raise ConfigError(f"serve.batch_wait_timeout_s must be in [0, 10] seconds, got {sv.batch_wait_timeout_s}")
    if not 1 <= sv.port <= 65535:
        raise ConfigError(f"serve.port must be in [1, 65535], got {sv.port}")
    for name in ("ingress", "tokenizer", "llm", "decoder"):
        d: DeploymentConfig = getattr(sv, name)
        if d.num_cpus < 0 or d.num_gpus < 0 or d.num_cpus + d.num_gpus == 0 and name != "ingress":
            raise ConfigError(f"serve.{name} must reserve some CPU or GPU (num_cpus={d.num_cpus}, num_gpus={d.num_gpus})")
        if not 0 <= d.min_replicas <= d.max_replicas or d.max_replicas < 1:
            raise ConfigError(f"serve.{name}: need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                              f"{d.min_replicas} and {d.max_replicas}")
        if d.target_ongoing_requests <= 0 or min(d.upscale_delay_s, d.downscale_delay_s, d.look_back_period_s) < 0:
            raise ConfigError(f"serve.{name}: target_ongoing_requests must be > 0 and the delays >= 0")


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c.d=[1, 2]"]`` -> nested dict; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{p}'")
        node[parts[-1]] = value
    return nested


# ---- presets ------------------------------------------------------------------------------------------


def resolve_preset(preset: str | Path) -> Path:
    """A preset name (``tiny``) or a path to a YAML file."""
    p = Path(preset)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist; pass a preset name ({', '.join(list_presets())}) "
                              "or a YAML path")
        return p
    candidate = CONFIG_DIR / f"{preset}.yaml"
    if not candidate.exists():
        raise ConfigError(f"unknown preset '{preset}'; available: {', '.join(list_presets())} (or pass a YAML path)")
    return candidate


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(preset: str | Path | None = "tiny", overrides: list[str] | None = None) -> Config:
    """Build a config from a preset (name or YAML path) plus ``key=value`` overrides."""
    cfg = Config()
    if preset is not None:
        path = resolve_preset(preset)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        data = migrate(data, str(path), CONFIG_VERSION, unversioned=CONFIG_VERSION)
        data.setdefault("preset", path.stem)
        _apply(cfg, data, "", str(path))
    _apply(cfg, parse_overrides(overrides), "", "--set")
    _check(cfg)
    return cfg


def config_from_dict(data: dict[str, Any], source: str = "saved config") -> Config:
    """Rebuild a config saved with a checkpoint or bundle (``Config.to_dict`` output, any config version)."""
    cfg = Config()
    _apply(cfg, migrate(data, source, CONFIG_VERSION), "", source)
    _check(cfg)
    return cfg


def add_config_args(parser) -> None:
    """The arguments every job shares: ``--config`` and repeatable ``--set``."""
    parser.add_argument(
        "--config", default="tiny", metavar="PRESET_OR_YAML",
        help=f"preset name ({', '.join(list_presets())}) or path to a YAML config (default: tiny)",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set stage2.lambda_reg=0.1 (repeatable)",
    )
