"""cluster.yaml is a valid Ray cluster launcher config (validated against the schema Ray ships)."""

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def test_cluster_yaml_matches_rays_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]


def test_cluster_yaml_has_gpu_and_cpu_workers_and_sets_the_shared_storage():
    import re

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    types = config["available_node_types"]
    assert {"gpu_worker", "cpu_worker"} <= set(types)
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # drivers only: work goes to the workers
    setup = "\n".join(config["setup_commands"])
    (storage,) = re.findall(r"export MAVILT_STORAGE=(\S+?)'", setup)
    assert re.match(r"^(s3|gs|abfs)://", storage)  # an object store every node reaches, not a local path


def test_jobs_take_their_storage_from_the_environment_when_no_flag_names_it(monkeypatch):
    from mavilt.cli import STORAGE_ENV, training_parser

    monkeypatch.setenv(STORAGE_ENV, "s3://bucket/runs")
    assert training_parser(None, "stage1").parse_args(["--data", "d"]).storage == "s3://bucket/runs"
    assert training_parser(None, "stage1").parse_args(["--data", "d", "--storage", "x"]).storage == "x"
    monkeypatch.delenv(STORAGE_ENV)
    with pytest.raises(SystemExit):
        training_parser(None, "stage1").parse_args(["--data", "d"])  # required when nothing names it
