"""`ray_cluster.yaml` is a real cluster launcher config: Ray's own schema accepts it after the
launcher's own defaults are filled in, as `ray up` does before it starts anything."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

CONFIG = Path(__file__).resolve().parent.parent / "ray_cluster.yaml"


def _prepared() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(CONFIG.read_text()))
    validate_config(config)
    return config


def test_ray_cluster_yaml_passes_rays_schema_validation():
    config = _prepared()
    types = config["available_node_types"]
    assert config["head_node_type"] == "head"
    assert {"head", "cpu_worker", "gpu_worker"} <= set(types)
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert types["cpu_worker"]["min_workers"] <= types["cpu_worker"]["max_workers"]


def test_schema_validation_would_catch_a_broken_config():
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import validate_config

    broken = copy.deepcopy(_prepared())
    broken["available_node_types"]["cpu_worker"]["min_workers"] = "two"
    with pytest.raises(ValidationError):
        validate_config(broken)


def test_ray_cluster_yaml_installs_and_starts_trainyard_with_token_auth():
    config = _prepared()
    assert any("make setup" in c for c in config["setup_commands"])
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "trainyard mlflow-server" in head
    for commands in (head, worker):
        assert "RAY_AUTH_MODE=token" in commands
        assert "MLFLOW_TRACKING_URI=http://" in commands
        assert "TRAINYARD_STORAGE_PATH=s3://" in commands
    assert "--dashboard-host=127.0.0.1" in head
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # The MLflow server asks for the login that every node's Ray processes carry; the login
    # comes from a mounted file, never from this config.
    assert "trainyard mlflow-server --auth" in head
    assert config["file_mounts"]["~/.trainyard/mlflow.env"] == "~/.trainyard/mlflow.env"
    assert config["file_mounts"]["~/.trainyard/model.key"] == "~/.trainyard/model.key"
    for commands in (config["head_start_ray_commands"][-1], worker):
        assert commands.index(". ~/.trainyard/mlflow.env") < commands.index("ray start")
    assert "MLFLOW_TRACKING_PASSWORD=" not in CONFIG.read_text()
    assert ".venv" in config["rsync_exclude"]
