"""The resource plan: how a cluster's CPUs and GPUs are shared by training workers and Ray Data.

Ray Train workers that reserve every CPU leave Ray Data none, and a streamed run then hangs
forever waiting for a preprocessing task that can never be scheduled. The plan keeps CPUs for
Ray Data, makes every Ray Data task ask for no more than that, and checks that the workers fit
on the nodes that exist, before anything starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from pipelines.spec import ScalingSpec, SpecError

MIN_DATA_CPUS = 0.5
DATA_CPU_SHARE = 0.25
MIN_WORKER_CPUS = 0.25
"""The least CPU a training worker gets: more workers than the CPUs allow at this share are
refused rather than started as dozens of starved processes."""


@dataclass(frozen=True)
class Nodes:
    """Resources of the alive nodes of a cluster, one entry per node."""

    cpus: tuple[float, ...]
    gpus: tuple[float, ...]

    @property
    def total_cpus(self) -> float:
        return sum(self.cpus)

    @property
    def total_gpus(self) -> float:
        return sum(self.gpus)


@dataclass(frozen=True)
class ResourcePlan:
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    data_cpus: float
    """CPUs left free for Ray Data while training runs."""
    data_task_cpus: float
    """CPUs each Ray Data task asks for (never more than `data_cpus`, so tasks always fit)."""
    torch_threads: int
    """Intra-op threads for each worker's torch."""
    placement_strategy: str
    nodes: Nodes

    def describe(self) -> str:
        n = self.nodes
        lines = [
            f"cluster: {len(n.cpus)} node(s), {n.total_cpus:g} CPUs, {n.total_gpus:g} GPUs",
            f"training: {self.num_workers} worker(s) × {self.cpus_per_worker:g} CPU"
            + (f" + {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else "")
            + f", {self.torch_threads} torch thread(s) each, placement {self.placement_strategy}",
            f"Ray Data: {self.data_cpus:g} CPU(s) kept free, {self.data_task_cpus:g} CPU per task",
        ]
        return "\n".join(lines)

    def worker_resources(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            res["GPU"] = self.gpus_per_worker
        return res


def _fits(per_worker: float, workers: int, node_cpus: tuple[float, ...]) -> bool:
    """Whether `workers` workers of `per_worker` CPUs each fit on these nodes."""
    return sum(math.floor(c / per_worker + 1e-9) for c in node_cpus) >= workers


def plan_resources(scaling: ScalingSpec, nodes: Nodes) -> ResourcePlan:
    """Share `nodes` between `scaling.num_workers` training workers and Ray Data.

    Raises SpecError when the workers cannot fit or would leave Ray Data no CPU.
    """
    w = scaling.num_workers
    total = nodes.total_cpus
    most = math.floor((total - MIN_DATA_CPUS) / MIN_WORKER_CPUS + 1e-9)
    if w > most:
        raise SpecError(
            f"scaling.num_workers: {w} worker(s) need at least {w * MIN_WORKER_CPUS:g} CPUs "
            f"({MIN_WORKER_CPUS:g} each) besides {MIN_DATA_CPUS:g} for Ray Data; the cluster "
            f"has {total:g}: use at most {max(most, 0)} worker(s), or a bigger cluster"
        )
    if scaling.use_gpu and nodes.total_gpus < w:
        raise SpecError(
            f"scaling.use_gpu: {w} worker(s) need {w} GPU(s), the cluster has {nodes.total_gpus:g}"
        )
    data = scaling.data_cpus or max(MIN_DATA_CPUS, DATA_CPU_SHARE * total)
    if data >= total:
        raise SpecError(
            f"scaling.data_cpus: {data:g} CPU(s) for Ray Data leave none of the cluster's "
            f"{total:g} for training"
        )
    if scaling.cpus_per_worker is not None:
        per_worker = scaling.cpus_per_worker
        if w * per_worker > total - data + 1e-9:
            raise SpecError(
                f"scaling.cpus_per_worker: {w} worker(s) × {per_worker:g} CPU leave "
                f"{max(total - w * per_worker, 0):g} of {total:g} CPUs for Ray Data, which needs "
                f"{data:g}; the run would hang. Use at most {(total - data) / w:g}, fewer "
                "workers, or a bigger cluster"
            )
        if not _fits(per_worker, w, nodes.cpus):
            raise SpecError(
                f"scaling.cpus_per_worker: {w} worker(s) × {per_worker:g} CPU do not fit on "
                f"nodes with {', '.join(f'{c:g}' for c in nodes.cpus)} CPUs"
            )
        if per_worker < MIN_WORKER_CPUS:
            raise SpecError(
                f"scaling.cpus_per_worker: {per_worker:g} is below the floor of "
                f"{MIN_WORKER_CPUS:g} CPU a training worker needs"
            )
    elif scaling.use_gpu:
        # A GPU worker needs a CPU to drive it; the rest preprocess data.
        per_worker = min(1.0, (total - data) / w)
    else:
        # The largest equal share that fits on the nodes: either the even split of what data
        # leaves, or a node's CPUs divided by a whole number of workers.
        even = (total - data) / w
        candidates = {even} | {c / k for c in nodes.cpus for k in range(1, w + 1)}
        fitting = [
            p
            for p in candidates
            if MIN_WORKER_CPUS - 1e-9 <= p <= even + 1e-9 and _fits(p, w, nodes.cpus)
        ]
        if not fitting:
            raise SpecError(
                f"scaling.num_workers: {w} worker(s) do not fit on nodes with "
                f"{', '.join(f'{c:g}' for c in nodes.cpus)} CPUs while keeping {data:g} "
                "for Ray Data"
            )
        per_worker = max(fitting)
    per_worker = round(per_worker, 4)
    left = round(total - w * per_worker, 4)
    return ResourcePlan(
        num_workers=w,
        cpus_per_worker=per_worker,
        gpus_per_worker=1.0 if scaling.use_gpu else 0.0,
        data_cpus=left,
        data_task_cpus=min(1.0, left),
        torch_threads=max(1, math.floor(per_worker)),
        placement_strategy=scaling.placement_strategy,
        nodes=nodes,
    )


def cluster_nodes() -> Nodes:
    """The alive nodes of the Ray cluster this process is connected to."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    return Nodes(
        cpus=tuple(float(n["Resources"].get("CPU", 0)) for n in alive),
        gpus=tuple(float(n["Resources"].get("GPU", 0)) for n in alive),
    )


def local_nodes() -> Nodes:
    """This machine as a one-node cluster, as a local `ray.init()` would see it."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except ImportError:
        pass
    return Nodes(cpus=(float(os.cpu_count() or 1),), gpus=(float(gpus),))
