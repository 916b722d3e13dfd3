"""ingest: feeding a training loop. torch DataLoader(num_workers=k) for k = 0..cores against
Ray Data's iter_torch_batches, with the same preprocessing and batch size; and the share of
step time a real training loop waits for data from Ray Data, against the same loop fed from
batches prepared in memory beforehand."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trainyard.pipelines.bench.core import Case, alternate, best, ray_data_reservation, timed
from trainyard.pipelines.training.step import train_epoch

BATCH = 256


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float32), d.target.astype(np.int64)


def augment(x: np.ndarray, y: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """The preprocessing under test, per batch: 8×8 digits upsampled to 32×32, jittered,
    noised, blurred and standardised (numpy, a few ms per batch of 256)."""
    rng = np.random.default_rng(seed)
    img = np.repeat(np.repeat(x.reshape(-1, 8, 8), 4, axis=1), 4, axis=2)
    dx, dy = rng.integers(-2, 3, 2)
    img = np.roll(img, (int(dx), int(dy)), axis=(1, 2))
    img = img + rng.normal(0.0, 0.5, img.shape)
    for axis in (1, 2):  # a 3-tap blur along each axis
        img = (np.roll(img, 1, axis) + 2 * img + np.roll(img, -1, axis)) / 4
    img = (img - img.mean(axis=(1, 2), keepdims=True)) / (
        img.std(axis=(1, 2), keepdims=True) + 1e-6
    )
    return {"x": img.reshape(len(img), -1).astype(np.float32), "y": y}


def batch_rows(b: int, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = (np.arange(b * BATCH, (b + 1) * BATCH)) % len(x)
    return x[idx], y[idx]


class Batches(torch.utils.data.Dataset):
    """Batch b of the preprocessed data (a DataLoader with batch_size=None hands them on)."""

    def __init__(self, n_batches: int, x: np.ndarray, y: np.ndarray):
        self.n, self.x, self.y = n_batches, x, y

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, b: int) -> dict[str, torch.Tensor]:
        out = augment(*batch_rows(b, self.x, self.y), seed=b)
        return {k: torch.from_numpy(v) for k, v in out.items()}


def _ray_batch(batch: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    outs = [augment(*batch_rows(int(b), x, y), seed=int(b)) for b in batch["id"]]
    return {k: np.concatenate([o[k] for o in outs]) for k in ("x", "y")}


def ray_dataset(n_batches: int, x: np.ndarray, y: np.ndarray, blocks: int):
    """The batches through Ray Data, without its per-operator CPU reservation (order does not
    matter here; see core.ray_data_reservation)."""
    import ray.data

    with ray_data_reservation(False):
        return ray.data.range(n_batches, override_num_blocks=blocks).map_batches(
            _ray_batch, fn_kwargs={"x": x, "y": y}, batch_size=1, num_cpus=1
        )


def consume(batches) -> int:
    n = 0
    for batch in batches:
        n += int(batch["x"].shape[0] > 0)
    return n


def run(quick: bool, cores: int, **_: Any) -> list[Case]:
    x, y = digits()
    n_batches = 8 if quick else 200
    repeats = 1 if quick else 3
    loaders = {
        k: torch.utils.data.DataLoader(
            Batches(n_batches, x, y),
            batch_size=None,
            num_workers=k,
            persistent_workers=k > 0,
            multiprocessing_context="spawn" if k > 0 else None,
        )
        for k in range(cores + 1)
    }

    def ray_pass() -> int:
        return consume(
            ray_dataset(n_batches, x, y, blocks=2 * cores).iter_torch_batches(
                batch_size=BATCH, prefetch_batches=cores
            )
        )

    contenders = {
        f"DataLoader(num_workers={k})": lambda dl=dl: timed(lambda: consume(dl))
        for k, dl in loaders.items()
    }
    contenders["Ray Data iter_torch_batches"] = lambda: timed(ray_pass)
    seconds = alternate(contenders, repeats)
    values = {c: [n_batches / s for s in v] for c, v in seconds.items()}
    best_loader = best(values, "DataLoader")
    feed = Case("ingest", "feeding batches", "batches/s", True, best_loader, values)
    feed.notes.append(
        f"{n_batches} batches of {BATCH} digits upsampled to 32×32 with jitter, noise and blur; "
        f"ratio to the best DataLoader setting ({best_loader}); DataLoader workers are "
        "persistent (started before timing); Ray Data starts its tasks in every pass"
    )

    # Data wait in a real training loop: the foundation's train_epoch fed by Ray Data vs by
    # batches prepared beforehand.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(1024, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ready = [Batches(n_batches, x, y)[b] for b in range(n_batches)]
    shares: dict[str, list[float]] = {"Ray Data": [], "in memory": []}

    def run_epoch(batches, name: str) -> float:
        stats = train_epoch(
            model,
            batches,
            optimizer,
            scheduler,
            scaler,
            loss_fn=torch.nn.functional.cross_entropy,
            steps=n_batches,
        )
        shares[name].append(stats.data_wait_share)
        return stats.seconds / stats.steps * 1000

    step_ms = alternate(
        {
            "Ray Data": lambda: run_epoch(
                ray_dataset(n_batches, x, y, blocks=2 * cores).iter_torch_batches(
                    batch_size=BATCH, prefetch_batches=cores
                ),
                "Ray Data",
            ),
            "in memory": lambda: run_epoch(ready, "in memory"),
        },
        repeats,
    )
    train = Case("ingest", "training step time", "ms/step", False, "in memory", step_ms)
    wait = Case(
        "ingest",
        "data-wait share of step time",
        "%",
        False,
        "Ray Data",
        {k: [100 * s for s in v[-repeats:]] for k, v in shares.items()},
    )
    train.notes.append(
        "one process, the MLP 1024-512-10 on the same batches; Ray Data preprocesses in its "
        "own tasks while the loop trains"
    )
    return [feed, train, wait]
