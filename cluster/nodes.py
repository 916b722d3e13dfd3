"""The nodes a run can plan on: the Ray cluster's alive nodes and those its autoscaler can still
add (from the cluster launcher config), or this machine alone; each node's CPUs, GPUs and custom
resources (`Nodes`), which cluster.resources plans on."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Nodes:
    """Resources of a cluster's nodes, one entry per node: the alive ones, then those its
    autoscaler can still add (the last `addable`)."""

    cpus: tuple[float, ...]
    gpus: tuple[float, ...]
    other: tuple[dict[str, float], ...] = ()
    """Custom resources per node (empty: none on any node)."""
    addable: int = 0
    """How many of the nodes (the last ones) are not up yet: the autoscaler starts them when
    work asks for them."""

    @classmethod
    def of(cls, nodes: list[dict[str, float]], addable: int = 0) -> Nodes:
        """Nodes from one resource dict per node (CPU, GPU and custom resources)."""
        return cls(
            cpus=tuple(r.get("CPU", 0.0) for r in nodes),
            gpus=tuple(r.get("GPU", 0.0) for r in nodes),
            other=tuple({k: v for k, v in r.items() if k not in ("CPU", "GPU")} for r in nodes),
            addable=addable,
        )

    def resources(self, i: int) -> dict[str, float]:
        """Everything node `i` offers, by Ray resource name."""
        other = self.other[i] if self.other else {}
        return {"CPU": self.cpus[i], "GPU": self.gpus[i], **other}

    @property
    def alive(self) -> Nodes:
        n = len(self.cpus) - self.addable
        return Nodes(self.cpus[:n], self.gpus[:n], self.other[:n] if self.other else ())

    def scaled(self, share: float) -> Nodes:
        """`share` of every node's CPUs and GPUs (what one of several runs at once may use)."""
        if share == 1:
            return self
        return Nodes(
            tuple(c * share for c in self.cpus),
            tuple(g * share for g in self.gpus),
            self.other,
            self.addable,
        )

    @property
    def total_cpus(self) -> float:
        return sum(self.cpus)

    @property
    def total_gpus(self) -> float:
        return sum(self.gpus)


AUTOSCALING_CONFIG_ENV = "TRAINYARD_AUTOSCALING_CONFIG"
DEFAULT_AUTOSCALING_CONFIG = "~/ray_bootstrap_config.yaml"
"""Where `ray up` leaves the cluster launcher config on the head node, where jobs' drivers run."""
# Ray's bookkeeping resources, not something a worker asks for.
_INTERNAL = ("memory", "object_store_memory", "node:")


def cluster_nodes() -> Nodes:
    """The alive nodes of the Ray cluster this process is connected to, then the nodes its
    autoscaler can add (from the cluster launcher config, see `addable_nodes`)."""
    import ray

    alive = [
        {k: float(v) for k, v in n["Resources"].items() if not k.startswith(_INTERNAL)}
        for n in ray.nodes()
        if n.get("Alive")
    ]
    more = addable_nodes(alive)
    return Nodes.of(alive + more, addable=len(more))


def addable_nodes(alive: list[dict[str, float]]) -> list[dict[str, float]]:
    """The worker nodes the cluster's autoscaler can still start, one resource dict each:
    per node type of the launcher config ($TRAINYARD_AUTOSCALING_CONFIG, else the one `ray up`
    leaves on the head), `max_workers` less the alive nodes of that shape, within the
    cluster's `max_workers`. Empty without a config (a cluster that does not autoscale)."""
    path = Path(os.environ.get(AUTOSCALING_CONFIG_ENV) or DEFAULT_AUTOSCALING_CONFIG)
    path = path.expanduser()
    if not path.is_file():
        return []
    config = yaml.safe_load(path.read_text()) or {}
    head_type = config.get("head_node_type")
    room = int(config.get("max_workers", 0)) - max(len(alive) - 1, 0)
    more: list[dict[str, float]] = []
    for name, node_type in (config.get("available_node_types") or {}).items():
        if name == head_type:
            continue
        shape = {
            k: float(v)
            for k, v in (node_type.get("resources") or {}).items()
            if not k.startswith(_INTERNAL)
        }
        up = sum(1 for r in alive if {k: v for k, v in r.items() if v} == shape)
        count = min(int(node_type.get("max_workers", 0)) - up, room - len(more))
        more += [shape] * max(count, 0)
    return more


def local_nodes() -> Nodes:
    """This machine as a one-node cluster, as a local `ray.init()` would see it."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except ImportError:
        pass
    return Nodes(cpus=(float(os.cpu_count() or 1),), gpus=(float(gpus),))
