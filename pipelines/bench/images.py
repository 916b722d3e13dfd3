"""images: the work DataLoader workers exist for. Reading, decoding, resizing and randomly
cropping and flipping class-folder images into batches: torch DataLoader(num_workers=k) over an
ImageFolder-style Dataset for k = 0..cores, against Ray Data doing the same (trainyard's
streamed path), and against trainyard's default, which decodes once and only augments every
pass. Then the share of a ResNet's training step spent waiting for Ray Data's batches, fed the
way trainyard's workers are fed (the next pass starting while one trains)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from trainyard.models import resnet
from trainyard.pipelines.bench.core import Case, alternate, best, ray_data_reservation, timed
from trainyard.pipelines.data.arrays import crop_flip, decode_image, normalize
from trainyard.pipelines.data.augment import ROW
from trainyard.pipelines.data.images.files import digits_images
from trainyard.pipelines.data.images.pipeline import as_dataset, decode_batch, train_batch
from trainyard.pipelines.training.feed import ahead
from trainyard.pipelines.training.step import train_epoch

BATCH = 128
SIZE = (64, 64)
"""The digits' 8×8 PNG files are decoded, converted to RGB and resized to this."""
AUGMENT = {"crop_padding": 4, "flip": True}
STATS = {"mean": [0.3, 0.3, 0.3], "std": [0.3, 0.3, 0.3]}


def image_files(n: int) -> tuple[list[str], np.ndarray]:
    """`n` paths cycling through the digits' PNG files, and their classes."""
    files = sorted(str(p) for p in digits_images().glob("*/*.png"))
    paths = [files[i % len(files)] for i in range(n)]
    return paths, np.array([int(p.rsplit("/", 2)[-2]) for p in paths])


class ImageFolder(torch.utils.data.Dataset):
    """What a DataLoader user writes (torchvision's ImageFolder + RandomCrop +
    RandomHorizontalFlip + Normalize): each item read, decoded, resized, augmented."""

    def __init__(self, paths: list[str], labels: np.ndarray):
        self.paths, self.labels, self.epoch = paths, labels, 1

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with open(self.paths[i], "rb") as f:
            image = decode_image(f.read(), SIZE, "RGB")[None]
        image = crop_flip(image, np.array([i]), AUGMENT["crop_padding"], True, 0, self.epoch)
        return torch.from_numpy(normalize(image, **STATS)[0]), int(self.labels[i])


def consume(batches) -> int:
    n = 0
    for batch in batches:
        x = batch["x"] if isinstance(batch, dict) else batch[0]
        n += int(x.shape[0] > 0)
    return n


def run(quick: bool, cores: int, **_: Any) -> list[Case]:
    import ray.data

    n = 256 if quick else 16384
    repeats = 1 if quick else 3
    paths, labels = image_files(n)
    table = pa.table({"path": paths, "label": labels, ROW: np.arange(n)})
    options = {"filesystem": pafs.LocalFileSystem(), "size": SIZE, "mode": "RGB", "skip": False}
    n_batches = n // BATCH
    dataset = ImageFolder(paths, labels)
    loaders = {
        k: torch.utils.data.DataLoader(
            dataset,
            batch_size=BATCH,
            shuffle=True,
            drop_last=True,
            num_workers=k,
            persistent_workers=k > 0,
            multiprocessing_context="spawn" if k > 0 else None,
        )
        for k in range(cores + 1)
    }
    with ray_data_reservation(False):
        kept = as_dataset(table, blocks=4 * cores).map_batches(
            decode_batch, fn_kwargs=options, batch_size=None, batch_format="numpy"
        )
        kept = kept.materialize()

    def ray_pass(source: Any, pass_number: int, decode: dict | None) -> Any:
        with ray_data_reservation(False):
            mapped = source.map_batches(
                train_batch,
                fn_kwargs={"seed": 0, "pass_number": pass_number, "augment": AUGMENT, **STATS}
                | ({"decode": decode} if decode else {}),
                batch_format="numpy",
            )
        return mapped.iter_torch_batches(
            batch_size=BATCH, drop_last=True, local_shuffle_buffer_size=4 * BATCH
        )

    files = ray.data.from_arrow(table).repartition(4 * cores).materialize()
    passes = iter(range(1, 1000))
    contenders = {
        f"DataLoader(num_workers={k})": lambda dl=dl: timed(lambda: consume(dl))
        for k, dl in loaders.items()
    }
    contenders["Ray Data: read, decode, augment"] = lambda: timed(
        lambda: consume(ray_pass(files, next(passes), options))
    )
    contenders["Ray Data: decoded once, augment (trainyard)"] = lambda: timed(
        lambda: consume(ray_pass(kept, next(passes), None))
    )
    seconds = alternate(contenders, repeats)
    values = {c: [n_batches / s for s in v] for c, v in seconds.items()}
    best_loader = best(values, "DataLoader")
    feed = Case("images", "decode + augment into batches", "batches/s", True, best_loader, values)
    feed.notes.append(
        f"{n} PNG files (the digits, cycled) read, decoded, converted to RGB and resized to "
        f"{SIZE[0]}×{SIZE[1]}, randomly cropped (padding 4) and flipped, normalized, in batches "
        f"of {BATCH}; ratio to the best DataLoader setting ({best_loader}). DataLoader workers "
        "are persistent (started before timing); every Ray Data pass is a new execution"
    )
    return [feed, data_wait(table, options, quick)]


def data_wait(table: pa.Table, options: dict[str, Any], quick: bool) -> Case:
    """configs/digits-images.yaml's ResNet (depth 10, width 16, 16×16 greyscale images, 64 a
    step) fed by Ray Data passes over the decoded images, each started while the previous one
    trains (as trainyard's workers run them), against the same steps on batches held in
    memory."""
    torch.manual_seed(0)
    model = resnet(in_channels=1, num_classes=10, depth=10, width=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch, passes = 64, 2 if quick else 6
    table = table.slice(0, 2048)
    steps = table.num_rows // batch
    options = options | {"size": (16, 16), "mode": "L"}
    kept = as_dataset(table).map_batches(
        decode_batch, fn_kwargs=options, batch_size=None, batch_format="numpy"
    )
    kept = kept.materialize()
    stats = {"mean": [0.3], "std": [0.3]}

    def one_pass(pass_number: int):
        return kept.map_batches(
            train_batch,
            fn_kwargs={"seed": 0, "pass_number": pass_number, "augment": AUGMENT, **stats},
            batch_format="numpy",
        ).iter_torch_batches(batch_size=batch, drop_last=True, local_shuffle_buffer_size=256)

    def epoch(batches) -> float:
        stats = train_epoch(
            model,
            batches,
            optimizer,
            scheduler,
            scaler,
            loss_fn=torch.nn.functional.cross_entropy,
            steps=steps,
        )
        return 100 * stats.data_wait_share

    # One torch thread, as each of the digits run's 2 workers has: the other core is Ray
    # Data's (torch would otherwise spin on both, and starve it).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        feed = ahead(one_pass, first=1, last=passes)
        fed = [epoch(feed(p)) for p in range(1, passes + 1)]
        ready = list(one_pass(0))
        started = time.perf_counter()
        memory = [epoch(iter(ready)) for _ in range(passes - 1)]
        step_ms = 1000 * (time.perf_counter() - started) / (steps * (passes - 1))
    finally:
        torch.set_num_threads(threads)
    case = Case(
        "images",
        "data-wait share of a ResNet's step",
        "%",
        False,
        "Ray Data, passes after the first",
        {
            "Ray Data, passes after the first": fed[1:],
            "Ray Data, first pass (start-up)": fed[:1],
            "in memory": memory,
        },
    )
    case.notes.append(
        f"configs/digits-images.yaml's ResNet in one process with one torch thread: {passes} "
        f"passes of {steps} steps "
        f"of {batch} images ({step_ms:.0f} ms a step in memory); each Ray Data pass crops and "
        "normalizes the decoded images in its own tasks while the loop trains on the one before"
    )
    return case
