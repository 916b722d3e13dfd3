"""The resource plan: how a cluster's CPUs and GPUs are shared by training workers and Ray Data.

Ray Train workers that reserve every CPU leave Ray Data none, and a streamed run then hangs
forever waiting for a preprocessing task that can never be scheduled. The plan keeps CPUs for
Ray Data, makes every Ray Data task ask for no more than that, and checks that the workers fit
on the nodes that exist, before anything starts.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Literal

from trainyard.cluster.errors import SpecError, TrainyardError
from trainyard.cluster.errors import check as _check
from trainyard.cluster.nodes import Nodes

MIN_DATA_CPUS = 0.5
DATA_CPU_SHARE = 0.25
MIN_WORKER_CPUS = 0.25
"""The least CPU a training worker gets: more workers than the CPUs allow at this share are
refused rather than started as dozens of starved processes."""


@dataclass
class ScalingSpec:
    """The `scaling` part of a run spec: how many workers, on what, placed how."""

    num_workers: int | list[int] = 2
    """Training workers (data-parallel ranks). `[min, max]` runs elastic: the run starts once
    `min` fit, and restarts from its newest checkpoint at the size that fits (at most `max`)
    when a node is lost or, checked every `resize_interval_s`, when more fit; the global batch
    stays, split over the workers there are (its data must be held in memory)."""
    resize_interval_s: float = 60.0
    """Elastic runs: the least seconds between two looks at whether the workers could grow
    (Ray Train's elastic_resize_monitor_interval_s)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """`ddp`: every worker holds the whole model, gradients and optimizer state. `fsdp`: each
    holds 1/num_workers of them (FSDP2), for models too big for one device."""
    blocks: list[str] | None = None
    """Class names of the model's repeated blocks (FSDP's units, and activation checkpointing's).
    None: the model's `_no_split_modules` (built-in models and Hugging Face's declare them), else
    the modules of its `nn.ModuleList`s."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them."""
    cpu_offload: bool = False
    """`fsdp` only: keep each worker's shards of parameters, gradients and optimizer state in
    CPU memory (FSDP2's CPUOffloadPolicy), copying a block to the GPU while it computes, so a
    model whose shards do not fit the GPUs trains, slower (the optimizer steps on the CPU). On
    CPU workers everything is in CPU memory already: it changes nothing."""
    use_gpu: bool = False
    cpus_per_worker: float | None = None
    """CPUs each training worker reserves; None lets the resource plan leave CPUs for Ray Data."""
    data_cpus: float | None = None
    """CPUs kept free for Ray Data's preprocessing tasks; None means a quarter (at least 0.5)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How workers are placed on nodes; SPREAD puts them on different nodes where it can."""
    storage_path: str | None = None
    """Where checkpoints go (a directory or pyarrow URI). None: $TRAINYARD_STORAGE_PATH (set by
    the cluster), else ./results (~/trainyard/results in a Ray job). On a multi-node cluster a
    directory must be one that every node sees."""

    max_failures: int | None = None
    """Worker or node failures survived by restarting from the newest checkpoint (Ray Train's
    FailureConfig). None: 2 on a multi-node cluster, 0 on one node."""
    max_preemptions: int = 10
    """Node preemptions survived (a cloud reclaiming a spot node, announced or not), counted
    apart from max_failures: each restarts from the newest checkpoint, without the node."""
    preemption_check_s: float | None = 2.0
    """On a multi-node or elastic run, ask for preemption notices (a node drained with a
    deadline) every this many seconds of training; on one, checkpoint the step at once and
    resume from it without the node (docs/failures.md). None: no notices (a preempted node
    is then a lost node: the steps since the newest checkpoint are trained again)."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each worker asks for besides its CPUs and GPU, e.g.
    `{"accelerator_type:A100": 0.001}` or a resource your node types declare."""
    start_timeout_s: float | None = None
    """Seconds to wait for the training workers to be placed (at the start and after each
    failure) before the run fails, naming what it asked for and what the cluster had free.
    None: 120, or 600 when the workers need nodes the autoscaler has yet to start."""

    def __post_init__(self) -> None:
        n = self.num_workers
        _check(
            n >= 1 if isinstance(n, int) else len(n) == 2 and 1 <= n[0] <= n[1],
            "scaling.num_workers",
            n,
            "an integer >= 1, or [min, max] with 1 <= min <= max (elastic)",
        )
        _check(
            not self.cpu_offload or self.strategy == "fsdp",
            "scaling.cpu_offload",
            self.cpu_offload,
            "false unless scaling.strategy is fsdp (DDP keeps the whole model on each device)",
        )
        _check(
            self.resize_interval_s > 0,
            "scaling.resize_interval_s",
            self.resize_interval_s,
            "a positive number of seconds",
        )
        _check(
            self.blocks is None or (len(self.blocks) > 0 and all(self.blocks)),
            "scaling.blocks",
            self.blocks,
            "a list of module class names, or null",
        )
        _check(
            self.max_failures is None or self.max_failures >= 0,
            "scaling.max_failures",
            self.max_failures,
            "an integer >= 0 or null",
        )
        _check(
            isinstance(self.max_preemptions, int) and self.max_preemptions >= 0,
            "scaling.max_preemptions",
            self.max_preemptions,
            "an integer >= 0",
        )
        _check(
            self.preemption_check_s is None or self.preemption_check_s > 0,
            "scaling.preemption_check_s",
            self.preemption_check_s,
            "a positive number of seconds, or null",
        )
        _check(
            all(v > 0 for v in self.resources_per_worker.values()),
            "scaling.resources_per_worker",
            self.resources_per_worker,
            "positive amounts",
        )
        _check(
            self.start_timeout_s is None or self.start_timeout_s > 0,
            "scaling.start_timeout_s",
            self.start_timeout_s,
            "a positive number of seconds",
        )
        _check(
            self.cpus_per_worker is None or self.cpus_per_worker > 0,
            "scaling.cpus_per_worker",
            self.cpus_per_worker,
            "a positive number or null",
        )
        _check(
            self.data_cpus is None or self.data_cpus > 0,
            "scaling.data_cpus",
            self.data_cpus,
            "a positive number or null",
        )

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        """The most workers the run trains on (all of them, when it is not elastic)."""
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers


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
        up = n.alive
        more = n.addable and (
            f" (+ up to {n.addable} node(s) the autoscaler can add: "
            f"{n.total_cpus - up.total_cpus:g} CPUs, {n.total_gpus - up.total_gpus:g} GPUs)"
        )
        lines = [
            f"cluster: {len(up.cpus)} node(s), {up.total_cpus:g} CPUs, {up.total_gpus:g} GPUs"
            + (more or ""),
            f"training: {self.workers_text} × {self.cpus_per_worker:g} CPU"
            + (f" + {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else "")
            + f", {self.torch_threads} torch thread(s) each, placement {self.placement_strategy}",
            f"Ray Data: {self.data_cpus:g} CPU(s) kept free, {self.data_task_cpus:g} CPU per task",
        ]
        return "\n".join(lines)

    custom: dict[str, float] | None = None
    """Custom resources each worker asks for besides CPUs and GPUs."""
    elastic: tuple[int, int] | None = None
    """An elastic run's (min, max) workers: it starts once min fit; None: not elastic."""

    @property
    def starts_with(self) -> int:
        """The workers that must fit for the run to start."""
        return self.elastic[0] if self.elastic else self.num_workers

    def worker_resources(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            res["GPU"] = self.gpus_per_worker
        return res | (self.custom or {})

    @property
    def needs_new_nodes(self) -> bool:
        """Whether the workers fit only once the autoscaler has added nodes."""
        return _places(self.worker_resources(), self.nodes.alive) < self.starts_with

    @property
    def workers_text(self) -> str:
        """`2 worker(s)`, or `1 to 3 worker(s), elastic (3 fit now)`."""
        if self.elastic is None:
            return f"{self.num_workers} worker(s)"
        low, high = self.elastic
        return f"{low} to {high} worker(s), elastic ({self.num_workers} fit now)"


def short_of(wanted: dict[str, float], free: dict[str, float]) -> dict[str, float]:
    """The resources of `wanted` that `free` holds less of."""
    return {k: v for k, v in wanted.items() if free.get(k, 0.0) < v - 1e-9}


def wait_for_free(
    wanted: dict[str, float], timeout_s: float, poll_s: float = 0.1
) -> dict[str, float]:
    """Wait until the cluster has `wanted` free (other work may hold it; Ray's view of free
    resources also lags tasks that just finished by up to a second), at most `timeout_s`.
    Returns the free resources then: the caller decides what falling short means (the one
    wait for free resources every part of trainyard uses)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        free = ray.available_resources()
        if not short_of(wanted, free) or time.monotonic() >= deadline:
            return free
        time.sleep(poll_s)


def format_resources(resources: dict[str, float], zeros: bool = False) -> str:
    """`CPU 0.75, GPU 1`, as every message shows resources; zero amounts only with `zeros`
    (what is free: none of it is news)."""
    return ", ".join(f"{k} {v:g}" for k, v in resources.items() if v or zeros)


def _places(need: dict[str, float], nodes: Nodes) -> int:
    """How many workers asking for `need` each fit on these nodes (all resources at once)."""
    total = 0
    for i in range(len(nodes.cpus)):
        have = nodes.resources(i)
        total += min(math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0)
    return total


def _fits(per_worker: float, workers: int, node_cpus: tuple[float, ...]) -> bool:
    """Whether `workers` workers of `per_worker` CPUs each fit on these nodes."""
    return sum(math.floor(c / per_worker + 1e-9) for c in node_cpus) >= workers


def plan_resources(scaling: ScalingSpec, nodes: Nodes) -> ResourcePlan:
    """Share `nodes` between `scaling.num_workers` training workers and Ray Data; an elastic
    run is planned at the most workers that fit now (each worker's share is what it keeps
    when more fit later).

    Raises SpecError when the workers (an elastic run's `min`) cannot fit or would leave Ray
    Data no CPU.
    """
    if not scaling.elastic:
        return _plan(scaling.num_workers, scaling, nodes)
    elastic = (scaling.min_workers, scaling.max_workers)
    for w in range(scaling.max_workers, scaling.min_workers, -1):
        try:
            return dataclasses.replace(_plan(w, scaling, nodes), elastic=elastic)
        except SpecError:
            continue
    return dataclasses.replace(_plan(scaling.min_workers, scaling, nodes), elastic=elastic)


def _plan(w: int, scaling: ScalingSpec, nodes: Nodes) -> ResourcePlan:
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
    custom = dict(scaling.resources_per_worker)
    need = {"CPU": per_worker, "GPU": 1.0 if scaling.use_gpu else 0.0, **custom}
    if _places(need, nodes) < w:
        raise SpecError(
            f"scaling: {w} worker(s) asking for {format_resources(need)} each do not fit on "
            f"the cluster's nodes{' or those its autoscaler can add' if nodes.addable else ''}: "
            + "; ".join(format_resources(nodes.resources(i)) for i in range(len(nodes.cpus)))
        )
    return ResourcePlan(
        num_workers=w,
        cpus_per_worker=per_worker,
        gpus_per_worker=1.0 if scaling.use_gpu else 0.0,
        data_cpus=left,
        data_task_cpus=min(1.0, left),
        torch_threads=max(1, math.floor(per_worker)),
        placement_strategy=scaling.placement_strategy,
        nodes=nodes,
        custom=custom or None,
    )


# --- shares of the cluster: trials of a search, actor pools ------------------------------------

TRIAL_MIN_WORKER_CPUS = 0.5
"""The least CPU `max_concurrent: auto` gives a trial's worker: more trials at once than that
allows only make every trial slower."""


@dataclass(frozen=True)
class Concurrency:
    trials: int
    """Trials at once."""
    plan: ResourcePlan
    """Each trial's resource plan, on its share of the cluster."""

    @property
    def share(self) -> float:
        return 1 / self.trials


def plan_trials(
    scaling: ScalingSpec, nodes: Nodes, trials: int, max_concurrent: int | str
) -> Concurrency:
    """How many trials of a search run at once, and each one's resources: `max_concurrent`
    (tune.max_concurrent), or (auto) as many as give each trial's workers at least
    scaling.cpus_per_worker (else TRIAL_MIN_WORKER_CPUS) with Ray Data's share kept, and never
    more than the trials."""
    if max_concurrent != "auto":
        share = nodes.scaled(1 / max_concurrent)
        try:
            return Concurrency(max_concurrent, plan_resources(scaling, share))
        except SpecError as e:
            raise SpecError(
                f"tune.max_concurrent: {max_concurrent} trials at once leave each "
                f"{nodes.total_cpus / max_concurrent:.3g} CPU(s) of the cluster's "
                f"{nodes.total_cpus:g}: {e}"
            ) from None
    least = scaling.cpus_per_worker or TRIAL_MIN_WORKER_CPUS
    best = None
    for k in range(1, trials + 1):
        try:
            plan = plan_resources(scaling, nodes.scaled(1 / k))
        except SpecError:
            break
        if plan.cpus_per_worker + 1e-9 < least:
            break
        best = Concurrency(k, plan)
    if best is None:  # not even one trial fits: the same error a plain run gives
        plan_resources(scaling, nodes)
        raise AssertionError("unreachable")
    return best


def plan_actors(
    total: dict[str, float],
    workers: int | None,
    cpus_per_worker: float,
    gpus_per_worker: float,
    keep_cpus: float,
) -> int:
    """The actors of a pool (trainyard predict) on a cluster of `total` resources: `workers`,
    else one per CPU (per GPU share with GPUs), `keep_cpus` kept for the tasks that read and
    write. Refused when they would leave those no CPU: the pool would wait forever."""
    cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
    if gpus_per_worker and gpus < gpus_per_worker:
        raise TrainyardError(
            f"--gpus-per-worker {gpus_per_worker:g}: the cluster has {gpus:g} GPU(s)"
        )
    if workers is None:
        workers = int(min(cpus, (cpus - keep_cpus) // cpus_per_worker))
        if gpus_per_worker:
            workers = min(workers, int(gpus // gpus_per_worker))
    if workers < 1 or workers * cpus_per_worker > cpus - keep_cpus:
        raise TrainyardError(
            f"--workers {workers} x --cpus-per-worker {cpus_per_worker:g} leaves no CPU of the "
            f"cluster's {cpus:g} to read and write with (they need {keep_cpus:g}); use fewer"
        )
    return workers
