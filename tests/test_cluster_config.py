"""cluster.yaml is a valid Ray cluster launcher config (validated against the schema Ray ships)."""

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_cluster_yaml_matches_rays_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
