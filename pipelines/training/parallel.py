"""Data parallelism over the workers: DDP (every rank holds the whole model) or FSDP2 (each rank
holds 1/N of the parameters, gradients and optimizer state, gathering a block's parameters only
while it runs).

Which modules are a model's *blocks* (FSDP's units of gathering, and activation checkpointing's)
is named by class: `scaling.blocks`, else the model's own `_no_split_modules` (the convention
Hugging Face models and trainyard's built-ins follow), else the members of its `nn.ModuleList`s.
The model code never knows how it is parallelised.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from trainyard.cluster.errors import SpecError

BYTES_FP32 = 4


def block_names(model: nn.Module, named: Iterable[str] | None = None) -> list[str]:
    """The class names of `model`'s blocks: `named` (each must match some module: SpecError
    otherwise), else the model's `_no_split_modules`, else what its ModuleLists hold; [] when
    it has none (the whole model is then one unit)."""
    present = {type(m).__name__ for m in model.modules() if m is not model}
    if named is not None:
        named = list(named)
        missing = [n for n in named if n not in present]
        if missing:
            known = ", ".join(sorted(present)[:12]) + (" …" if len(present) > 12 else "")
            raise SpecError(
                f"scaling.blocks: {', '.join(missing)} match(es) no module of "
                f"{type(model).__name__} (its module classes: {known})"
            )
        return named
    declared = getattr(model, "_no_split_modules", None)
    if declared:
        return [n for n in declared if n in present]
    listed = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]
    return sorted({type(m).__name__ for m in listed})


def blocks_of(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    """The modules of `model` whose class is named in `names`, outermost only (a block inside
    a block is part of it), in the order `model.modules()` visits them."""
    names = set(names)
    found: list[nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():
        if id(m) in inside or m is model:
            continue
        if type(m).__name__ in names:
            found.append(m)
            inside.update(id(s) for s in m.modules())
    return found


def per_rank_bytes(params: int, strategy: str, world: int, optimizer: str) -> dict[str, int]:
    """What each worker holds for a model of `params` fp32 parameters, in bytes: parameters,
    gradients and optimizer state (AdamW: two moments; SGD with momentum: one). DDP holds them
    whole on every rank; FSDP holds 1/world of each (rounded up: shards are padded), plus the
    one block it gathers at a time, which this does not count."""
    moments = 2 if optimizer == "adamw" else 1
    share = -(-params // world) if strategy == "fsdp" else params
    return {
        "parameters": share * BYTES_FP32,
        "gradients": share * BYTES_FP32,
        "optimizer": moments * share * BYTES_FP32,
    }


def describe_bytes(held: dict[str, int]) -> str:
    """'parameters 1.2 MB + gradients 1.2 MB + optimizer 2.4 MB = 4.8 MB' (GB from 1 GB)."""
    scale, unit = (1e9, "GB") if sum(held.values()) >= 1e9 else (1e6, "MB")
    parts = " + ".join(f"{k} {v / scale:.3g} {unit}" for k, v in held.items())
    return f"{parts} = {sum(held.values()) / scale:.3g} {unit}"


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of `tensors` this rank holds (parameters, gradients, optimizer state: its shards,
    under FSDP)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def mixed_precision(amp_dtype: torch.dtype | None) -> Any:
    """FSDP2's policy for `amp_dtype`: parameters gathered in it, gradients reduced in fp32
    (the sharded parameters and optimizer state stay fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)


def shard(
    model: nn.Module,
    device: torch.device,
    world: int,
    blocks: list[str],
    amp_dtype: torch.dtype | None,
    cpu_offload: bool = False,
) -> nn.Module:
    """FSDP2 over all `world` ranks: `fully_shard` on each block, then on the root (which
    keeps what no block holds: embeddings, heads, tied weights). An explicit device mesh: with
    a gloo group on a machine with a GPU, FSDP2 would otherwise move the model to CUDA. With
    `cpu_offload` the shards (and gradients, and so the optimizer's state) stay in CPU memory."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    options = {
        "mesh": mesh,
        "mp_policy": mixed_precision(amp_dtype),
        "offload_policy": (
            CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
        ),
    }
    for block in blocks_of(model, blocks):
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def checkpoint_blocks(model: nn.Module, blocks: list[str]) -> int:
    """Recompute each block's activations in the backward pass instead of keeping them
    (activation checkpointing); the number of blocks wrapped."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )

    names = set(blocks)
    wrapped = blocks_of(model, names)
    if wrapped:
        targets = {id(m) for m in wrapped}
        apply_activation_checkpointing(model, check_fn=lambda m: id(m) in targets)
    return len(wrapped)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a whole optimizer state of checkpoint format 3 (keys are parameter names) on every
    rank, each keeping its shards; a state of formats 1 and 2 (keyed by position, written under
    DDP) loads as it was saved."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if all(isinstance(i, int) for g in state["param_groups"] for i in g["params"]):
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )


def grad_scaler(device: torch.device, amp_dtype: torch.dtype | None, sharded: bool) -> Any:
    """fp16's loss scaler (disabled otherwise); under FSDP the sharded one, which agrees on an
    overflow across the ranks' shards."""
    enabled = amp_dtype == torch.float16
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, enabled=enabled)
    return torch.amp.GradScaler(device.type, enabled=enabled)


def full_parameters(model: nn.Module) -> Iterable[torch.Tensor]:
    """Each parameter whole (gathered from every rank under FSDP: a collective)."""
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        yield p.full_tensor() if isinstance(p, DTensor) else p
