"""Per-epoch random augmentation on Ray Data, the job DataLoader workers used to do.

The training split gets a row-position column and is cut into one shard per rank on the
driver. Every pass, each rank maps the user's `fn(batch, rng) -> batch` over its shard with Ray
Data tasks (on the CPUs the plan keeps for Ray Data, while the workers train) and streams the
result. Each batch's generator is seeded from (seed, pass, the position of its first row), so a
pass draws the same whether the run got there straight or resumed from a checkpoint, and every
pass draws anew.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ROW = "__row"


def rank_shards(train: Any, world: int, task_cpus: float) -> list[Any]:
    """The (materialized) training split with each row's position, in `world` equal shards."""
    import ray
    import ray.data

    number = ray.remote(_numbered).options(num_cpus=task_cpus)
    refs, start = [], 0
    for bundle in train.iter_internal_ref_bundles():
        for ref, meta in zip(bundle.block_refs, bundle.metadata, strict=True):
            refs.append(number.remote(ref, start))
            start += meta.num_rows
    return ray.data.from_arrow_refs(refs).materialize().split(world, equal=True)


def _numbered(block: Any, start: int) -> Any:
    """A block as an Arrow table with the positions of its rows, from `start` on."""
    import pyarrow as pa
    from ray.data.block import BlockAccessor

    table = BlockAccessor.for_block(block).to_arrow()
    return table.append_column(ROW, pa.array(np.arange(start, start + table.num_rows)))


def augment_batch(
    batch: dict[str, np.ndarray], ref: str, seed: int, pass_number: int
) -> dict[str, np.ndarray]:
    """The user's augmentation `ref` applied to one batch (a Ray Data batch function)."""
    from pipelines import user

    fn = user.load_callable(ref, "data.augment")
    batch = dict(batch)
    rows = batch.pop(ROW)
    rng = np.random.default_rng([seed, pass_number, int(rows[0]) if len(rows) else 0])
    out = fn(batch, rng)
    if not isinstance(out, dict) or not {"x", "y"} <= set(out):
        got = sorted(out) if isinstance(out, dict) else type(out).__name__
        raise TypeError(f"data.augment: {ref} must return a dict with x and y, got {got}")
    return {"x": np.asarray(out["x"]), "y": np.asarray(out["y"])}


def augmented(shard: Any, ref: str, seed: int, pass_number: int, task_cpus: float) -> Any:
    """One pass of a rank's shard through the augmentation (lazy: Ray Data runs it while the
    rank consumes it)."""
    return shard.map_batches(
        augment_batch,
        fn_kwargs={"ref": ref, "seed": seed, "pass_number": pass_number},
        batch_format="numpy",
        num_cpus=task_cpus,
    )
