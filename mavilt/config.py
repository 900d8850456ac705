"""Typed configuration for every MAViLT stage.

A config is a tree of dataclasses. Presets live in ``configs/*.yaml`` and are partial trees: anything they
leave out keeps the dataclass default. Jobs apply ``--set section.key=value`` overrides on top (values are
parsed as YAML, then checked against the field's type). Unknown keys and wrong types raise
:class:`ConfigError` with one message that lists the valid keys. The resolved config is saved beside every
output (``config.yaml``) and hashed for the pipeline's skip logic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A user-caused configuration problem (bad key, bad type, bad value, missing file)."""


@dataclass
class DataConfig:
    """How shards are prepared (image size, bit depth) and how the synthetic set is drawn."""

    image_size: int = 64
    bit_depth: Literal[8, 16] = 8
    num_samples: int = 2000  # synthetic source only
    seed: int = 0
    split_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # train, validate, test
    rows_per_file: int = 1000
    # Ray Data map_batches size for conversion; small keeps memory flat with big DICOMs.
    batch_size: int = 16


@dataclass
class ComputeConfig:
    """Ray Train scaling shared by all training steps."""

    num_workers: int = 1
    use_gpu: bool = False
    # Fractional CPUs leave Ray Data a CPU of its own on small machines (see REFERENCE.md).
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    torch_threads: int = 1  # torch.set_num_threads inside each worker
    max_failures: int = 0  # FailureConfig(max_failures)
    keep_checkpoints: int = 2  # CheckpointConfig(num_to_keep), best by the step's validation score


@dataclass
class EncoderConfig:
    """The in-house CXR encoder (phi): a CheXpert multi-label classifier reused for FID and label fidelity."""

    width: int = 32
    depth: int = 4  # downsampling stages; feature dim = width * 2**(depth-1)
    lr: float = 2e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    max_steps: int = 600
    eval_every: int = 100
    seed: int = 0
    augment: bool = True


@dataclass
class VQGANConfig:
    """The image tokenizer and its composite loss."""

    downsample: int = 8  # f: tokens per image = (image_size / f) ** 2
    channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 4])  # n entries halve the size n-1 times: 2**(n-1) == downsample
    num_res_blocks: int = 1
    mid_block: bool = True  # two ResNet blocks at the lowest resolution (encoder and decoder)
    codebook_size: int = 256
    code_dim: int = 32
    codebook_decay: float = 0.95  # EMA decay of the codebook
    commitment_weight: float = 0.25
    dead_code_threshold: float = 1.0  # codes used fewer times per batch than this are restarted
    use_cosine_sim: bool = False  # l2-normalised codes and inputs (cosine distance) instead of Euclidean
    kmeans_init: bool = False  # initialise the codebook by k-means on the first training batch
    lambda_l1: float = 1.0
    lambda_grad: float = 1.0
    lambda_feat: float = 0.1
    lambda_perceptual: float = 0.0
    lambda_adv: float = 0.1
    disc_start: int = 100000  # step at which the adversarial term switches on
    disc_channels: int = 32
    disc_layers: int = 2
    feature_encoder: str = "inhouse"  # inhouse | xrv | module:<import.path>:<attr>
    feature_weights: str | None = None  # weights file for xrv / module encoders
    lr: float = 1e-3
    disc_lr: float = 2e-4
    batch_size: int = 32
    max_steps: int = 1500
    eval_every: int = 250
    seed: int = 0


@dataclass
class LLMConfig:
    """The causal LM whose vocabulary is extended with image codes."""

    base: str = "tiny"  # "tiny" builds a small Llama from the fields below; anything else: local HF path or hub name
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 688
    max_length: int = 256
    text_vocab_size: int = 3000  # BPE vocabulary trained by jobs/pretrain_text.py (tiny only)
    finetune: Literal["full", "lora"] = "full"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    gradient_checkpointing: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class LLMTrainConfig:
    """One training stage of the LLM (text pretraining, stage 1 or stage 2): the same loop runs all three."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    batch_size: int = 16  # per worker
    max_steps: int = 1000
    eval_every: int = 200
    log_every: int = 20
    lambda_reg: float = 0.0
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    seed: int = 0
    # Relative sampling weight of each task; stage 1 uses image_to_report/report_to_image.
    task_weights: dict[str, float] = field(default_factory=dict)
    report_section: Literal["findings", "impression", "both"] = "findings"
    condition_dropout: float = 0.1  # report->image: drop the report so classifier-free guidance can be used
    heldout_fraction: float = 0.05  # text pretraining: fixed part held out for perplexity


@dataclass
class GenerateConfig:
    max_new_tokens: int = 96
    num_beams: int = 3
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    cfg_scale: float = 1.0  # classifier-free guidance for report->image (1 = off)
    image_temperature: float = 1.0
    seed: int = 0


@dataclass
class EvalConfig:
    split: Literal["train", "validate", "test"] = "test"
    limit: int | None = None
    batch_size: int = 32
    report_section: Literal["findings", "impression", "both"] = "findings"
    uncertain_policy: Literal["negative", "positive"] = "negative"
    bootstrap_samples: int = 1000
    fid_network: str = "inhouse"  # inhouse | xrv | inception
    fid_weights: str | None = None
    max_words: int | None = 100  # R2Gen: 60 (IU X-ray) / 100 (MIMIC-CXR) words per report for the metrics
    nlg_bootstrap_samples: int = 200  # corpus BLEU/ROUGE are recomputed per replicate: fewer than for F1
    synth_limit: int | None = None  # studies to synthesise images for (None: all)
    retrieval_pool: int = 4000  # training images the nearest-neighbour baseline searches
    workers: int = 0  # Ray Data actors for generation; 0: auto (local on a CPU-only machine of <= 4 cores)
    seed: int = 0


@dataclass
class TuneConfig:
    num_samples: int = 8
    max_concurrent: int = 1
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    grace_period: int = 1  # ASHA: reports before a trial may be stopped
    reduction_factor: int = 2
    seed: int = 0


@dataclass
class ServeConfig:
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2.0
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.05
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class Config:
    preset: str = "tiny"
    data: DataConfig = field(default_factory=DataConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    pretrain_text: LLMTrainConfig = field(default_factory=LLMTrainConfig)
    stage1: LLMTrainConfig = field(default_factory=LLMTrainConfig)
    stage2: LLMTrainConfig = field(default_factory=LLMTrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    # ---- conversions -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path

    def hash(self, *sections: str) -> str:
        """Stable hash of the whole config, or of the named sections only."""
        d = self.to_dict()
        if sections:
            d = {s: d[s] for s in sections}
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---- validation and overrides -------------------------------------------------------------------------


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys.extend(_valid_keys(t, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def valid_keys() -> list[str]:
    """Every settable key, dotted (``stage2.lambda_reg``)."""
    return _valid_keys(Config)


def _unknown_key_error(key: str, source: str) -> ConfigError:
    return ConfigError(
        f"unknown config key '{key}' (from {source}). Valid keys: " + ", ".join(valid_keys())
    )


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow int->float and str->Path-like strings."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad() -> ConfigError:
        return ConfigError(
            f"config key '{key}' (from {source}) expects {_type_name(tp)}, got {value!r} "
            f"({type(value).__name__}). Fix the value; valid keys: " + ", ".join(valid_keys())
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
        raise ConfigError(
            f"config key '{key}' (from {source}) must be one of {list(args)}, got {value!r}"
        )
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


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + "/".join(map(str, typing.get_args(tp)))
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    return str(tp).replace("typing.", "")


def _apply(obj: Any, data: dict[str, Any], prefix: str, source: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key_error(dotted, source)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config section '{dotted}' (from {source}) must be a mapping, got {value!r}")
            _apply(getattr(obj, key), value, f"{dotted}.", source)
        else:
            setattr(obj, key, _coerce(value, tp, dotted, source))


def _check(cfg: Config) -> None:
    """Cross-field checks that a type alone cannot express."""
    d, v = cfg.data, cfg.vqgan
    if d.image_size % v.downsample:
        raise ConfigError(
            f"data.image_size={d.image_size} must be a multiple of vqgan.downsample={v.downsample}"
        )
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


def resolve_preset(preset: str | Path) -> Path:
    """A preset name (``tiny``) or a path to a YAML file."""
    p = Path(preset)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist; pass a preset name ({list_presets()}) or a YAML path")
        return p
    candidate = CONFIG_DIR / f"{preset}.yaml"
    if not candidate.exists():
        raise ConfigError(f"unknown preset '{preset}'; available: {list_presets()} (or pass a YAML path)")
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
        data.setdefault("preset", path.stem)
        _apply(cfg, data, "", str(path))
    _apply(cfg, parse_overrides(overrides), "", "--set")
    _check(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config saved with a checkpoint (``Config.to_dict`` output)."""
    cfg = Config()
    _apply(cfg, data, "", "saved config")
    _check(cfg)
    return cfg


def add_config_args(parser) -> None:
    """The arguments every job shares: ``--config`` and repeatable ``--set``."""
    parser.add_argument(
        "--config", default="tiny", help="preset name (tiny, base, paper) or path to a YAML config"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set stage2.lambda_reg=0.1 (repeatable)",
    )
