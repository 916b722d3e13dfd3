"""Shared fixtures: one local multi-node Ray cluster and one MLflow store per test session."""

from __future__ import annotations

import logging
import os

import pytest


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """A real SQLite MLflow store for the session, used by every run through the environment."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    uri = f"sqlite:///{db}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def ray_cluster():
    """A head and two worker nodes, each a real raylet with one logical CPU."""
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def train(config, out, *overrides: str) -> dict:
    """`trainyard train CONFIG` with `--set` overrides and checkpoints under `out`; asserts it
    succeeded and returns its --summary."""
    import json

    from pipelines.train import main

    summary = out / "summary.json"
    overrides = (f"scaling.storage_path={out / 'results'}", *overrides)
    rc = main(
        [str(config), "--summary", str(summary), *[a for o in overrides for a in ("--set", o)]]
    )
    assert rc == 0
    return json.loads(summary.read_text())


@pytest.fixture
def storage(tmp_path) -> str:
    return str(tmp_path / "results")


LAST = ("test_fault_tolerance", "test_bench")


def pytest_collection_modifyitems(items):
    """Run the tests that kill nodes and drivers of the shared cluster, then the benchmark (many
    Ray Train and Ray Data runs of its own), last, so that nothing they leave behind in Ray
    (dead nodes, aborted runs) can disturb the other tests."""

    def order(item) -> int:
        name = item.module.__name__.rsplit(".", 1)[-1]
        return LAST.index(name) + 1 if name in LAST else 0

    items.sort(key=order)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test stopped by pytest-timeout reports what Ray was waiting for when it hung."""
    outcome = yield
    report = outcome.get_result()
    if call.when == "call" and call.excinfo and "Timeout" in str(call.excinfo.value):
        report.sections.append(("Ray state at the timeout", ray_state()))


def ray_state() -> str:
    """Resources free and in total, placement groups and actors that are not done."""
    import ray

    if not ray.is_initialized():
        return "Ray is not initialized in the test process"
    from ray.util.state import list_actors, list_placement_groups

    lines = [f"available: {ray.available_resources()}", f"total: {ray.cluster_resources()}"]
    for pg in list_placement_groups(
        filters=[("state", "!=", "REMOVED")], raise_on_missing_output=False
    ):
        lines.append(f"placement group {pg.placement_group_id} {pg.state} {pg.bundles}")
    for actor in list_actors(filters=[("state", "!=", "DEAD")], raise_on_missing_output=False):
        lines.append(f"actor {actor.class_name} {actor.state} pid={actor.pid} node={actor.node_id}")
    return "\n".join(lines)


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
