"""cluster.yaml and deploy/cluster-local.yaml pass Ray's own cluster-config preparation and
JSON-schema validation (what `ray up` runs before touching a cloud), offline."""

import copy
import os

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = [os.path.join(ROOT, "cluster.yaml"), os.path.join(ROOT, "deploy", "cluster-local.yaml")]


def load(path):
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_cluster_config_passes_rays_schema(path):
    config = prepare_config(load(path))
    validate_config(config)
    assert config["cluster_name"].startswith("distillery")


def test_aws_config_has_a_cpu_head_and_an_autoscaling_gpu_worker_type():
    config = prepare_config(load(CONFIGS[0]))
    types = config["available_node_types"]
    assert config["provider"]["type"] == "aws"
    assert types[config["head_node_type"]]["node_config"]["InstanceType"].startswith("m5")
    gpu = types["gpu_worker"]
    assert gpu["node_config"]["InstanceType"].startswith("g5")
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= config["max_workers"]
    assert any("distillery" in c for c in config["setup_commands"])


def test_the_validation_can_fail():
    config = prepare_config(load(CONFIGS[0]))
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_wrokers"] = 1  # a typo
    with pytest.raises(jsonschema.ValidationError, match="min_wrokers"):
        validate_config(broken)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_the_jobs_api_listens_on_the_heads_loopback_only(path):
    """The Ray Jobs API runs any command it is sent, unauthenticated: users reach it
    through `ray dashboard` (an SSH tunnel), never over the network."""
    starts = [c for c in load(path)["head_start_ray_commands"] if c.startswith("ray start")]
    assert len(starts) == 1 and "--dashboard-host=127.0.0.1" in starts[0].split()
