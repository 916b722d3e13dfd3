"""Per-epoch random augmentation on Ray Data, the job DataLoader workers used to do.

The training rows get a row-position column and are cut into one shard per rank on the driver.
Every pass, each rank maps the pipeline's batch function over its shard with Ray Data tasks (on
the CPUs the plan keeps for Ray Data, while the workers train) and streams the result. Random
draws are seeded from (seed, pass, row position), so a pass draws the same whether the run got
there straight or resumed from a checkpoint, and every pass draws anew.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from trainyard.pipelines.config import user
from trainyard.pipelines.data.arrays import derive_seed
from trainyard.pipelines.data.common import PerEpoch, block_refs, settle

ROW = "__row"


def rank_shards(rows: Any, world: int, task_cpus: float) -> list[Any]:
    """The (materialized) rows with each row's position, in `world` equal shards."""
    import ray
    import ray.data

    number = ray.remote(_numbered).options(num_cpus=task_cpus)
    refs, start = [], 0
    for ref, num_rows, _ in block_refs(rows):
        refs.append(number.remote(ref, start))
        start += num_rows
    ray.wait(refs, num_returns=len(refs))
    settle()
    shards = ray.data.from_arrow_refs(refs).materialize().split(world, equal=True)
    settle()
    return shards


def _numbered(block: Any, start: int) -> Any:
    """A block as an Arrow table with the positions of its rows, from `start` on."""
    from ray.data.block import BlockAccessor

    table = BlockAccessor.for_block(block).to_arrow()
    return table.append_column(ROW, pa.array(np.arange(start, start + table.num_rows)))


def augment_batch(
    batch: dict[str, np.ndarray], seed: int, pass_number: int, ref: str
) -> dict[str, np.ndarray]:
    """The user's augmentation `ref` (`fn(batch, rng) -> batch`) applied to one batch of model
    inputs; its generator is seeded from (seed, pass, the batch's first row)."""
    fn = user.load_callable(ref, "data.augment")
    batch = dict(batch)
    rows = batch.pop(ROW)
    first = int(rows[0]) if len(rows) else 0
    rng = np.random.default_rng(derive_seed(seed, "augment", pass_number, first))
    out = fn(batch, rng)
    if not isinstance(out, dict) or not {"x", "y"} <= set(out):
        got = sorted(out) if isinstance(out, dict) else type(out).__name__
        raise TypeError(f"data.augment: {ref} must return a dict with x and y, got {got}")
    return {"x": np.asarray(out["x"]), "y": np.asarray(out["y"])}


def plan(train: Any, ref: str | None) -> Any:
    """The PerEpoch of a user's augmentation `ref` over the training rows (None: none)."""
    fn = "trainyard.pipelines.data.augment:augment_batch"
    return PerEpoch(train, fn, {"ref": ref}) if ref else None


def one_pass(
    shard: Any, per_epoch: dict[str, Any], seed: int, pass_number: int, task_cpus: float
) -> Any:
    """One pass of a rank's shard through the batch function (lazy: Ray Data runs it while the
    rank consumes it). `per_epoch`: the PerEpoch's fn, kwargs and remote_args."""

    # Blocks in a new order every pass (rows are shuffled within a window as they stream).
    blocks = derive_seed(seed, "blocks", pass_number) % 2**32
    return shard.randomize_block_order(seed=blocks).map_batches(
        user.load_callable(per_epoch["fn"], "data.augment"),
        fn_kwargs={"seed": seed, "pass_number": pass_number, **per_epoch["kwargs"]},
        batch_format="numpy",
        num_cpus=task_cpus,
        **(per_epoch["remote_args"] or {}),
    )
