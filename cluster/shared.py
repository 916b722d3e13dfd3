"""Which paths every node of the cluster can see.

On one machine every path is shared; on a real multi-node cluster a path on the driver's disk
exists only there. Rather than guess from addresses, ask the nodes: a zero-CPU task pinned to
each alive node looks for the path, and what it finds decides. Checkpoint storage and a local
MLflow store that some node cannot see are refused before training starts; data files that only
the driver's node has are read there.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from trainyard.cluster.errors import TrainyardError

LOOK_TIMEOUT_S = 120.0


def is_local(uri: str) -> bool:
    """A path on some node's own file system (not s3://, gs://, hdfs://, http://, ...)."""
    return "://" not in uri or uri.startswith("file://")


def _sizes(paths: list[str]) -> list[int | None]:
    return [os.path.getsize(p) if os.path.isfile(p) else None for p in paths]


def nodes_missing(paths: list[str]) -> dict[str, list[str]]:
    """For each of `paths`, the ids of the other alive nodes on which it is missing or has
    another size than on this node. Nothing to ask on a one-node cluster."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    others = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    missing: dict[str, list[str]] = {p: [] for p in paths}
    if not others or not paths:
        return missing
    expected = _sizes(paths)
    look = ray.remote(num_cpus=0, max_retries=0)(_sizes)
    refs = [
        look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(
            paths
        )
        for n in others
    ]
    try:
        found = ray.get(refs, timeout=LOOK_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise TrainyardError(
            f"could not ask every node within {LOOK_TIMEOUT_S:.0f} s whether it sees {paths[0]}"
        ) from None
    for node, sizes in zip(others, found, strict=True):
        for path, want, got in zip(paths, expected, sizes, strict=True):
            if got != want:
                missing[path].append(node)
    return missing


def check_cluster_paths(storage: str, mlflow_dir: str | None, data_files: list[str]) -> list[str]:
    """Refuse checkpoint storage or a local MLflow store that some node cannot see; return the
    data files that some node cannot see (to be read on this node)."""
    dirs = {"scaling.storage_path": storage} if is_local(storage) else {}
    if mlflow_dir is not None:
        dirs["the MLflow store"] = mlflow_dir
    probes = {}
    for what, directory in dirs.items():
        path = Path(directory.removeprefix("file://")).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        probes[what] = path / f".trainyard-probe-{uuid.uuid4().hex}"
        probes[what].write_text("trainyard: can every node see this directory?\n")
    try:
        missing = nodes_missing([str(p) for p in probes.values()] + data_files)
    finally:
        for probe in probes.values():
            probe.unlink(missing_ok=True)
    fixes = {
        "scaling.storage_path": "Use a directory every node mounts (NFS, EFS) or a URI such "
        "as s3://bucket/trainyard (TRAINYARD_STORAGE_PATH sets it for every job).",
        "the MLflow store": "Log to an MLflow server instead: run `trainyard mlflow-server` on "
        "the head and set MLFLOW_TRACKING_URI=http://HEAD:5000.",
    }
    for what, probe in probes.items():
        if nodes := missing[str(probe)]:
            raise TrainyardError(
                f"{what} {dirs[what]} is on this node's own disk: {len(nodes)} other node(s) "
                f"cannot see it ({', '.join(n[:12] for n in nodes)}). {fixes[what]}"
            )
    return [f for f in data_files if missing[f]]
