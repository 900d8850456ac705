"""Typed configs: presets, overrides, clear errors, saved and reloaded."""

from __future__ import annotations

import pytest
import yaml

from mavilt.config import Config, ConfigError, config_from_dict, list_presets, load_config, parse_overrides, valid_keys


@pytest.mark.parametrize("preset", ["tiny", "base", "paper", "micro"])
def test_presets_load_and_round_trip(preset, tmp_path):
    cfg = load_config(preset)
    assert cfg.preset == preset
    path = cfg.save(tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load(path.read_text()))
    assert again == cfg and again.hash() == cfg.hash()


def test_presets_are_listed():
    assert {"tiny", "base", "paper"} <= set(list_presets())


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


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["vqgan.lamda_grad=1"])
    msg = str(e.value)
    assert "unknown config key 'vqgan.lamda_grad'" in msg and "vqgan.lambda_grad" in msg and "stage2.lambda_reg" in msg


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


def test_every_valid_key_is_settable():
    cfg = Config()
    for key in valid_keys():
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section), name) if name else getattr(cfg, section)
        assert value is not None or name in ("limit", "feature_weights", "fid_weights", "synth_limit", "max_words")
