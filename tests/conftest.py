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


@pytest.fixture
def storage(tmp_path) -> str:
    return str(tmp_path / "results")


def pytest_collection_modifyitems(items):
    """Run the tests that kill nodes and drivers of the shared cluster last, so that nothing they
    leave behind in Ray (dead nodes, aborted runs) can disturb the other tests."""
    items.sort(key=lambda item: item.module.__name__.endswith("test_fault_tolerance"))


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
