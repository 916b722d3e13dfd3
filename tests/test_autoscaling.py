"""A run on a cluster whose autoscaler starts its worker nodes on demand: the resource plan
counts the nodes the autoscaler can add, and the run waits for them instead of being refused.

Ray's fake autoscaler (the `fake_multinode` provider: worker nodes are raylets started on this
machine when work asks for them) stands in for a cloud. Ray 2.60's AutoscalingCluster helper is
not used: its wheel lacks the example config it reads, and it runs `ray stop --force`, which
stops every Ray on the machine. This cluster's processes carry an id in their environment and
are stopped by it, as `trainyard cluster down` does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from trainyard.cluster.local import MARKER, free_port, stop_cluster_processes
from trainyard.cluster.nodes import AUTOSCALING_CONFIG_ENV

GPU_SHAPED = {"CPU": 1, "fake_gpu": 1}  # a GPU worker's shape, with a custom resource for the GPU


def node_ip() -> str:
    code = "import ray._private.services as s; print(s.get_node_ip_address())"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture(scope="module")
def autoscaling_cluster(tmp_path_factory):
    """A 1-CPU head whose autoscaler may add two GPU-shaped worker nodes (min 0)."""
    tmp = tmp_path_factory.mktemp("autoscaling")
    cluster_id, port = uuid.uuid4().hex[:8], free_port()
    address = f"{node_ip()}:{port}"
    config = tmp / "cluster.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "cluster_name": f"fake-{cluster_id}",
                "max_workers": 2,
                "provider": {
                    "type": "fake_multinode",
                    "gcs_address": address,
                    "use_node_id_as_ip": True,
                    "disable_node_updaters": True,
                    "disable_launch_config_check": True,
                },
                "available_node_types": {
                    "ray.head.default": {
                        "resources": {"CPU": 1},
                        "node_config": {},
                        "max_workers": 0,
                    },
                    "gpu_worker": {
                        "resources": GPU_SHAPED,
                        "node_config": {},
                        "min_workers": 0,
                        "max_workers": 2,
                    },
                },
                "head_node_type": "ray.head.default",  # the fake provider's name for its head
                "idle_timeout_minutes": 5,
                "upscaling_speed": 1.0,
                **{k: {} for k in ("auth", "docker", "file_mounts")},
                **{
                    k: []
                    for k in (
                        "initialization_commands",
                        "setup_commands",
                        "head_setup_commands",
                        "worker_setup_commands",
                        "head_start_ray_commands",
                        "worker_start_ray_commands",
                        "cluster_synced_files",
                        "rsync_exclude",
                        "rsync_filter",
                    )
                },
                "file_mounts_sync_continuously": False,
            }
        )
    )
    # Its own token, given to its processes and the run only: a fresh machine has no
    # ~/.ray/auth_token for `ray start` to find.
    token = os.environ.get("RAY_AUTH_TOKEN") or uuid.uuid4().hex + uuid.uuid4().hex
    env = os.environ | {
        "RAY_AUTH_TOKEN": token,
        MARKER: cluster_id,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_AUTH_MODE": "token",
    }
    ray = str(Path(sys.executable).with_name("ray"))
    head = [
        *(ray, "start", "--head", f"--port={port}", f"--autoscaling-config={config}"),
        *("--num-cpus=1", f"--temp-dir=/tmp/trainyard-{cluster_id}", "--include-dashboard=false"),
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        "--disable-usage-stats",
    ]
    try:
        subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
        yield address, config, token
    finally:
        stop_cluster_processes(cluster_id)


def test_gpu_shaped_run_waits_for_the_autoscaler(autoscaling_cluster, tracking_uri, tmp_path):
    address, config, token = autoscaling_cluster
    summary = tmp_path / "summary.json"
    sets = {
        "train.epochs": 2,
        "tracking.log_model": "false",
        "scaling.resources_per_worker": json.dumps({"fake_gpu": 1}),
        "scaling.storage_path": tmp_path / "results",
    }
    env = os.environ | {
        "RAY_ADDRESS": address,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "MLFLOW_TRACKING_URI": tracking_uri,
        AUTOSCALING_CONFIG_ENV: str(config),
    }
    done = subprocess.run(
        [
            *(sys.executable, "-m", "trainyard.pipelines.train", "configs/digits.yaml"),
            *("--summary", str(summary)),
            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = done.stdout
    assert "cluster: 1 node(s), 1 CPUs, 0 GPUs (+ up to 2 node(s) the autoscaler can add" in out
    # Ray Data asks the autoscaler for nodes during the data build, so they may be up before
    # the workers ask; if not, the run says that it waits for them.
    waiting = re.search(r"waiting up to (\d+) s for (.*?) \(", out)
    assert waiting is None or waiting.groups() == ("600", "the autoscaler to add nodes")
    run_id = json.loads(summary.read_text())["run_id"]
    tags = MlflowClient(tracking_uri).get_run(run_id).data.tags
    assert tags["num_nodes"] == "2"  # one worker on each node the autoscaler started
