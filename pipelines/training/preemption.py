"""Spot preemption in the workers. A cloud that reclaims a node says so ahead (30 s to 2 min);
Ray marks the node as draining with a deadline (`ray drain-node`, as the autoscaler and KubeRay
do) and Ray Train passes the notice to every worker (`ray.train.get_preemption_info`). The ranks
ask for it together, every `scaling.preemption_check_s` seconds of training (a barrier: every rank
makes the same calls), and on a notice the loop checkpoints the step it is at and trains no
further on this worker group: whatever it would train until the node goes would be lost. Ray
Train restarts the group without the node at the deadline (counted against
scaling.max_preemptions, not scaling.max_failures), and the run resumes at the step after the
checkpoint: no step is trained twice."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from trainyard.pipelines.training.step import EpochStats

MAX_CHECKS_APART = 10_000
"""The most steps between two checks (a step that takes microseconds)."""
DEADLINE_MARGIN_S = 120.0
"""How long past the deadline the workers wait for Ray Train to restart them before failing."""
NO_DEADLINE_S = 120.0
"""The wait for a notice without a deadline (Ray Train's own default is 60 s)."""


@dataclass(frozen=True)
class Notice:
    """A preemption notice as the ranks agreed on it."""

    nodes: list[str]
    ranks: list[int]
    deadline: float | None
    """Unix time at which the node goes (None: not said)."""

    def describe(self) -> str:
        nodes = ", ".join(n[:12] for n in self.nodes)
        left = f"in {self.deadline - time.time():.0f} s" if self.deadline else "at no set time"
        return f"node(s) {nodes} (rank(s) {self.ranks}) to be reclaimed {left}"


class PreemptionCheck:
    """Asks Ray Train for a preemption notice every `every_s` seconds of training, in step with
    every rank: called after each optimizer step (the same calls on every rank), it asks after
    as many steps as `every_s` takes at rank 0's pace, which rank 0 shares with the others at
    each ask. `every_s` None: never asks. Records what its asks cost (`seconds`, `asks`)."""

    def __init__(self, every_s: float | None, world: int, device: torch.device):
        self.every_s, self.world, self.device = every_s, world, device
        self.steps = 0
        self.due = 1
        self.since = time.perf_counter()
        self.seconds = 0.0
        self.asks = 0

    def __call__(self) -> Notice | None:
        if self.every_s is None:
            return None
        self.steps += 1
        if self.steps < self.due:
            return None
        import ray.train

        began = time.perf_counter()
        info = ray.train.get_preemption_info()
        per_step = (began - self.since) / max(self.steps, 1)
        apart = torch.tensor(
            [min(MAX_CHECKS_APART, max(1, round(self.every_s / max(per_step, 1e-9))))],
            device=self.device,
        )
        if self.world > 1:  # rank 0's pace for all (the ranks' clocks differ)
            dist.broadcast(apart, 0)
        self.steps, self.due, self.since = 0, int(apart.item()), time.perf_counter()
        self.seconds += self.since - began
        self.asks += 1
        if info is None:
            return None
        deadline = info.deadline_ms / 1000 if info.deadline_ms else None
        return Notice(list(info.preempted_node_ids), list(info.preempted_ranks), deadline)


def wait_to_be_moved(notice: Notice) -> None:
    """Train no further: wait for Ray Train to end this worker group at the deadline and
    restart it without the node. Raises if it has not come well after the deadline."""
    until = (notice.deadline or time.time() + NO_DEADLINE_S) + DEADLINE_MARGIN_S
    while time.time() < until:
        time.sleep(0.5)
    raise RuntimeError(
        f"preempted: {notice.describe()}, and Ray Train did not restart the workers within "
        f"{DEADLINE_MARGIN_S:.0f} s of the deadline"
    )


def worst(mode: str) -> float:
    """The monitor's worst value: what a checkpoint of part of an epoch reports to Ray Train,
    so that it is kept as the newest and never as the best."""
    return float("inf") if mode == "min" else float("-inf")


def in_epoch(result: EpochStats, loss_sum: float, samples: int) -> dict[str, Any]:
    """The part of an epoch a notice cut short, as a checkpoint keeps it (TrainingState.in_epoch):
    its steps, and the loss summed and the samples counted over every rank."""
    return {
        "steps": result.steps,
        "loss_sum": loss_sum,
        "samples": samples,
        "skipped": result.skipped,
        "seconds": result.seconds,
        "data_seconds": result.data_seconds,
        "nonfinite_run": result.nonfinite_run,
    }


def resumed_stats(part: dict[str, Any], first: bool) -> EpochStats:
    """`in_epoch` as the start of the epoch it cut short: on the `first` rank with every rank's
    loss and samples so far (the epoch's loss is summed over the ranks at its end), on the
    others with none; its steps on all."""
    samples = part["samples"] if first else 0
    return EpochStats(
        loss=part["loss_sum"] / samples if samples else 0.0,
        samples=samples,
        steps=part["steps"],
        seconds=part["seconds"],
        data_seconds=part["data_seconds"],
        skipped=part["skipped"],
        nonfinite_run=part["nonfinite_run"],
    )
