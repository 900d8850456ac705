"""Typed configs: presets, overrides, clear errors, saved and reloaded."""

from __future__ import annotations

import typing

import pytest
import yaml

from mavilt.config import (
    Config,
    ConfigError,
    config_from_dict,
    list_presets,
    load_config,
    parse_overrides,
    valid_keys,
)


@pytest.mark.parametrize("preset", ["tiny", "base", "paper", "micro"])
def test_presets_load_and_round_trip(preset, tmp_path):
    cfg = load_config(preset)
    assert cfg.preset == preset
    path = cfg.save(tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load(path.read_text()))
    assert again == cfg and again.hash() == cfg.hash()


def test_presets_are_listed():
    assert set(list_presets()) == {"tiny", "base", "paper", "micro"}


def test_tiny_leaves_ray_data_a_cpu_and_matches_threads():
    c = load_config("tiny").compute
    assert c.num_workers * c.cpus_per_worker <= 1.0 and not c.use_gpu
    assert load_config("paper").stage2.deepspeed_config.endswith("zero3.json")


def test_overrides_are_typed():
    cfg = load_config("tiny", ["stage2.lambda_reg=0.5", "vqgan.channel_mult=[1, 2, 2, 2]", "llm.finetune=lora",
                               "stage1.task_weights={image_to_report: 2}", "eval.limit=null", "vqgan.lr=1", "vqgan.disc_lr=3e-4"])
    assert cfg.stage2.lambda_reg == 0.5
    assert cfg.vqgan.channel_mult == [1, 2, 2, 2]
    assert cfg.llm.finetune == "lora"
    assert cfg.stage1.task_weights == {"image_to_report": 2.0}
    assert cfg.eval.limit is None
    assert cfg.vqgan.lr == 1.0 and isinstance(cfg.vqgan.lr, float) and cfg.vqgan.disc_lr == 3e-4
    assert cfg.hash() != load_config("tiny").hash()
    assert cfg.hash("data") == load_config("tiny").hash("data")


def test_unknown_key_lists_the_sections_valid_keys_with_type_and_help():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["vqgan.lamda_grad=1"])
    msg = str(e.value)
    assert "unknown config key 'vqgan.lamda_grad'" in msg and "Did you mean 'vqgan.lambda_grad'?" in msg
    assert "vqgan.lambda_grad (float): weight of the Sobel image-gradient term" in msg
    assert "vqgan.max_steps (int): training steps" in msg and "stage2." not in msg
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["stage3.lr=1"])
    assert "unknown config key 'stage3'" in str(e.value) and "stage2 (stage 2: instruction tuning" in str(e.value)


def test_a_wrong_type_names_the_keys_type_and_help():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["stage2.lambda_reg=strong"])
    assert str(e.value).endswith("stage2.lambda_reg (float): weight of lambda_reg * ||theta - theta_0||^2 (keeps the "
                                 "LM's language)")
    assert "vqgan." not in str(e.value)


def test_each_stage_offers_only_the_settings_it_uses():
    keys = set(valid_keys())
    assert "pretrain_text.heldout_fraction" in keys and "pretrain_text.lambda_reg" not in keys
    assert "pretrain_text.task_weights" not in keys and "pretrain_text.condition_dropout" not in keys
    assert "stage1.heldout_fraction" not in keys and "stage2.lambda_reg" in keys and "stage1.condition_dropout" in keys
    assert "serve.max_batch_size" in keys and "serve.llm.num_cpus" in keys and "tune.stage_steps" in keys
    with pytest.raises(ConfigError, match="stage1.task_weights names \\['vqa'\\], which is not stage1 tasks; stage1's "
                                          "tasks: image_to_report, report_to_image"):
        load_config("tiny", ["stage1.task_weights={vqa: 1}"])


def test_configs_saved_by_the_previous_version_still_load():
    """Version 1 accepted keys nothing read; reading one back drops them and keeps everything else."""
    old = Config().to_dict()
    old.pop("config_version")
    old["pretrain_text"].update(lambda_reg=0.5, task_weights={}, report_section="findings", condition_dropout=0.1)
    old["stage1"]["heldout_fraction"] = 0.05
    old["stage2"].update(heldout_fraction=0.05, lambda_reg=0.25)
    old["tune"] = {"num_samples": 8}
    old["serve"] = {"max_replicas": 2}
    cfg = config_from_dict(old)
    assert cfg.stage2.lambda_reg == 0.25 and cfg == Config().with_overrides(["stage2.lambda_reg=0.25"])
    newer = {**Config().to_dict(), "config_version": 99}
    with pytest.raises(ConfigError, match="config_version 99; this code reads versions 1 to 3"):
        config_from_dict(newer)


def test_with_overrides_returns_a_checked_copy():
    cfg = load_config("tiny")
    other = cfg.with_overrides(["generate.num_beams=3", "eval.limit=10"])
    assert (other.generate.num_beams, other.eval.limit) == (3, 10)
    assert cfg.generate.num_beams == 1 and cfg.eval.limit is None
    assert cfg.with_overrides({"stage2": {"lr": 0.5}}).stage2.lr == 0.5
    with pytest.raises(ConfigError, match="multiple of vqgan.downsample"):
        cfg.with_overrides(["data.image_size=60"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("vqgan.max_steps=ten", "expects int"),
        ("vqgan.max_steps=1.5", "expects int"),
        ("vqgan.lr=fast", "expects float"),
        ("compute.use_gpu=2", "expects bool"),
        ("llm.finetune=qlora", "must be one of ['full', 'lora']"),
        ("stage2.strategy=fsdp", "must be one of ['ddp', 'deepspeed']"),
        ("data.split_fractions=[0.5, 0.5]", "three non-negative numbers"),
        ("data.image_size=60", "multiple of vqgan.downsample"),
        ("vqgan.channel_mult=[1, 2]", "needs 4 entries"),
        ("vqgan", "section.key=value"),
        ("data=3", "must be a mapping"),
    ],
)
def test_bad_values_stop_with_one_clear_message(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        load_config("tiny", [override])


def test_missing_preset_and_file():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config("huge")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nowhere/config.yaml")


def test_yaml_file_preset(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("vqgan:\n  codebook_size: 512\n")
    cfg = load_config(p)
    assert cfg.vqgan.codebook_size == 512 and cfg.preset == "mine"
    p.write_text("vqgan:\n  codebok_size: 512\n")
    with pytest.raises(ConfigError, match=f"from {p}"):
        load_config(p)


def test_parse_overrides_nests_and_parses_yaml():
    assert parse_overrides(["a.b=1", "a.c=[x, y]", "d.e=hello world"]) == {"a": {"b": 1, "c": ["x", "y"]}, "d": {"e": "hello world"}}


def _another_value(key: str, current):
    """A valid value for ``key`` that differs from ``current``."""
    special = {
        "data.image_size": 72, "vqgan.downsample": 16, "data.split_fractions": [0.7, 0.2, 0.1],
        "vqgan.channel_mult": [1, 2, 4, 4], "stage1.task_weights": {"image_to_report": 2.0},
        "stage2.task_weights": {"vqa": 0.5}, "llm.lora_targets": ["q_proj"],
        "encoder.seed": 5,  # not tune.judge_seed: the judge must differ from phi
        "tune.lambda_grad": [2.0, 20.0], "tune.lambda_feat": [0.1, 1.0], "tune.lambda_reg": [1e-5, 1e-3],
        "tune.lr": [1e-4, 1e-2],
    }
    if key in special:
        return special[key]
    import functools

    owner = functools.reduce(getattr, key.split(".")[:-1], Config())
    tp = typing.get_type_hints(type(owner))[key.split(".")[-1]]
    if typing.get_origin(tp) is typing.Literal:
        return next(a for a in typing.get_args(tp) if a != current)
    if current is None:
        return 5 if int in typing.get_args(tp) else "other"
    if isinstance(current, str):
        return "other"
    if isinstance(current, bool):
        return not current
    if isinstance(current, int):
        return current + 1
    if isinstance(current, float):
        return current * 2 + 0.5
    raise AssertionError(f"no test value for {key} = {current!r}")


@pytest.mark.parametrize("key", valid_keys())
def test_every_valid_key_is_settable(key):
    import functools

    def get(cfg):
        return functools.reduce(getattr, key.split("."), cfg)

    current = get(Config())
    value = _another_value(key, current)
    overrides = [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
    if key == "vqgan.downsample":
        overrides.append("vqgan.channel_mult=[1, 2, 2, 4, 4]")
    if key.endswith(".min_replicas"):
        overrides.append(f"{key.rsplit('.', 1)[0]}.max_replicas={value}")
    cfg = Config().with_overrides(overrides)
    got = get(cfg)
    assert got == value and got != current
