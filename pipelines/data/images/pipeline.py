"""Images (`pipeline: images`): class folders → decoded and resized once → augmented every
epoch → a ResNet.

The driver lists the files (the class of an image is its folder), splits them by a seeded hash
of each file's path, stratified by class, and has Ray Data tasks read and decode them, in
blocks, into uint8 arrays kept in Ray's object store (or, when they would not fit, decoded
again from the source every epoch). Every epoch, Ray Data tasks crop, flip and normalize each
rank's share of the training images while the workers train: the work DataLoader workers do
on one machine, here on any node's CPUs. The validation images are normalized once.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from trainyard.cluster.secrets import redact_text
from trainyard.pipelines.config.spec import RunSpec
from trainyard.pipelines.data.arrays import crop_flip, decode_images, normalize
from trainyard.pipelines.data.augment import ROW, augment_batch
from trainyard.pipelines.data.common import (
    DataError,
    DataFacts,
    PerEpoch,
    Prepared,
    check_row_counts,
    errors_reported_here,
    fingerprint,
    settle,
    task_error,
)
from trainyard.pipelines.data.images.files import Listing, held_out
from trainyard.pipelines.data.images.spec import ImageDataSpec

FILES_PER_BLOCK = 256
"""Images one decode task reads."""
STATS_SAMPLE = 512
"""Training images the per-channel mean and standard deviation are measured on."""
CLUSTER_CHECK_FILES = 64
"""Files asked about on every node to decide whether all nodes see the data."""


# --- pure batch functions (run inside Ray Data tasks) ------------------------------------------


def decode_batch(
    batch: dict[str, np.ndarray],
    filesystem: pafs.FileSystem,
    size: tuple[int, int],
    mode: str,
    skip: bool,
) -> dict[str, np.ndarray]:
    """Rows {"path", "label", ...} → {"image": uint8 (n, h, w, c), "label", ...}: each file read
    and decoded; one that does not decode raises, naming it, or (`skip`) is left out."""

    def read(path: str) -> bytes:
        with filesystem.open_input_file(path) as f:
            return f.readall()

    def refuse(path: str, error: str) -> str:
        return (
            f"data.path: {path} does not decode as an image ({error}); fix or remove it, or set "
            "data.on_bad_rows=skip"
        )

    images, keep = decode_images(batch["path"], read, size, mode, None if skip else refuse)
    out = {k: v[keep] for k, v in batch.items() if k != "path"}
    out["image"] = images
    return out


def train_batch(
    batch: dict[str, np.ndarray],
    seed: int,
    pass_number: int,
    augment: Any,
    mean: list[float],
    std: list[float],
    decode: dict[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """One training batch of one pass: decoded (when `decode` says how: streamed from the
    source), augmented (the built-in crop and flip, or the user's `module:fn`), normalized.
    Draws are seeded from (seed, pass, image)."""
    if decode is not None:
        batch = decode_batch(batch, **decode)
    images, labels, rows = batch["image"], batch["label"], batch[ROW]
    if isinstance(augment, dict):
        images = crop_flip(
            images,
            rows,
            augment.get("crop_padding", 0),
            augment.get("flip", False),
            seed,
            pass_number,
        )
    elif augment:
        images, labels = user_augment(images, labels, rows, augment, seed, pass_number)
    return {"x": normalize(images, mean, std), "y": labels.astype(np.int64)}


def user_augment(
    images: np.ndarray, labels: np.ndarray, rows: np.ndarray, ref: str, seed: int, pass_number: int
) -> tuple[np.ndarray, np.ndarray]:
    """The user's `fn(batch, rng) -> batch` on uint8 images (its generator seeded as in
    trainyard.pipelines.data.augment), which it must return as uint8 images."""
    out = augment_batch({"x": images, "y": labels, ROW: rows}, seed, pass_number, ref)
    if out["x"].dtype != np.uint8 or out["x"].ndim != 4:
        raise TypeError(
            f"data.augment: {ref} must return x as uint8 images (n, height, width, channels), "
            f"got {out['x'].dtype} {out['x'].shape}"
        )
    return out["x"], out["y"]


def eval_batch(
    batch: dict[str, np.ndarray], mean: list[float], std: list[float]
) -> dict[str, np.ndarray]:
    """Decoded images as the network takes them, without augmentation."""
    return {"x": normalize(batch["image"], mean, std), "y": batch["label"].astype(np.int64)}


def local_files(spec: RunSpec) -> list[str]:
    """A spread sample of the image files on a local disk (none for URIs): whether every node
    sees them decides where they are read. Raises DataError for a path that is not class
    folders of images."""
    listing = Listing(spec.data)
    if not listing.local:
        return []
    step = max(1, len(listing.files) // CLUSTER_CHECK_FILES)
    return listing.files[::step]


# --- driver side --------------------------------------------------------------------------------


def as_dataset(table: pa.Table, blocks: int | None = None) -> Any:
    """A Ray Dataset of the table's rows, in blocks of FILES_PER_BLOCK rows (or `blocks`)."""
    import ray.data

    n = max(1, blocks or -(-table.num_rows // FILES_PER_BLOCK))
    size = -(-table.num_rows // n)
    return ray.data.from_arrow([table.slice(i, size) for i in range(0, table.num_rows, size)])


def decode_options(data: ImageDataSpec, fs: pafs.FileSystem) -> dict[str, Any]:
    return {
        "filesystem": fs,
        "size": tuple(data.image_size),
        "mode": data.mode,
        "skip": data.on_bad_rows == "skip",
    }


def keep_decoded(data: ImageDataSpec, num_files: int) -> bool:
    """data.keep_decoded, else whether the decoded images take at most half of the object
    store."""
    if data.keep_decoded is not None:
        return data.keep_decoded
    import ray

    channels = 3 if data.mode == "RGB" else 1
    need = num_files * data.image_size[0] * data.image_size[1] * channels
    return need <= ray.cluster_resources().get("object_store_memory", 0) / 2


def decoded(table: pa.Table, options: dict[str, Any], task_cpus: float, read_args: dict) -> Any:
    """The table's images decoded by Ray Data tasks (lazy)."""
    return as_dataset(table).map_batches(
        decode_batch,
        fn_kwargs=options,
        batch_size=None,
        batch_format="numpy",
        num_cpus=task_cpus,
        **(read_args or {}),
    )


def channel_stats(table: pa.Table, options: dict[str, Any]) -> tuple[list, list]:
    """Per-channel mean and standard deviation of up to STATS_SAMPLE training images spread over
    the split (decoded here: a few hundred small files)."""
    step = max(1, table.num_rows // STATS_SAMPLE)
    sample = table.take(np.arange(0, table.num_rows, step)[:STATS_SAMPLE])
    batch = decode_batch(
        {
            "path": np.asarray(sample["path"].to_pylist(), dtype=object),
            "label": np.zeros(sample.num_rows),
        },
        **(options | {"skip": True}),
    )
    x = batch["image"].astype(np.float64) / 255.0
    std = x.std(axis=(0, 1, 2))
    return x.mean(axis=(0, 1, 2)).tolist(), np.where(std > 1e-6, std, 1.0).tolist()


def prepare(
    spec: RunSpec,
    task_cpus: float,
    num_workers: int,
    rows_per_step: int,
    read_args: dict[str, Any] | None = None,
) -> Prepared:
    """List, split and decode the images; the validation split normalized, the training split
    with the batch function Ray Data maps over it every epoch."""
    data, seed = spec.data, spec.train.seed
    listing = Listing(data)
    held = held_out(listing.relative, listing.labels, data.validation_fraction, seed)
    check_every_class_held(listing, held, data.validation_fraction)
    options = decode_options(data, listing.fs)
    # The training files in a seeded random order (folders sort them by class): each rank's
    # share holds every class, and a pass streams them mixed.
    train_files, val_files = listing.table(~held, shuffle_seed=seed), listing.table(held)
    keep = keep_decoded(data, len(listing.files))
    train, train_files, val, num_train, num_val = decode_splits(
        train_files, val_files, options, keep, task_cpus, read_args
    )
    skipped = len(listing.files) - num_train - num_val
    if skipped:
        print(f"trainyard: skipped {skipped} image(s) that do not decode (data.on_bad_rows=skip)")
    check_row_counts(num_train, num_val, num_workers, rows_per_step)
    mean, std = channel_stats(train_files, options)
    stats = {"mean": mean, "std": std}
    # (Validation images are decoded once and kept, streamed or not: the workers read each
    # row once, by its position.)
    validation = val.map_batches(
        eval_batch, fn_kwargs=stats, batch_format="numpy", num_cpus=task_cpus
    ).materialize()
    channels, (height, width) = len(mean), data.image_size
    augment = data.augment
    per_epoch = PerEpoch(
        rows=train if keep else as_dataset(train_files, blocks=None).materialize(),
        fn="trainyard.pipelines.data.images.pipeline:train_batch",
        kwargs={"augment": augment, **stats} | ({} if keep else {"decode": options}),
        remote_args=None if keep else read_args,
    )
    print(
        f"trainyard: {redact_text(data.path)}: {len(listing.classes)} classes, "
        f"{num_train} + {num_val} images, {height}×{width} {data.mode}, "
        + ("decoded once, kept in the object store" if keep else "decoded every epoch")
    )
    return Prepared(
        train=(train if keep else decoded(train_files, options, task_cpus, read_args)).map_batches(
            eval_batch, fn_kwargs=stats, batch_format="numpy", num_cpus=task_cpus
        ),
        validation=validation,
        num_train=num_train,
        num_validation=num_val,
        facts={
            "in_channels": channels,
            "in_shape": [channels, height, width],
            "in_features": channels * height * width,
            "num_classes": len(listing.classes),
            "out_features": len(listing.classes),
        },
        data_facts=DataFacts(task="classification", unit="images", channels_last=True),
        params={
            "data.num_train": num_train,
            "data.num_validation": num_val,
            "data.skipped": skipped,
            "data.classes": ",".join(listing.classes)[:6000],
            "data.channel_mean": [round(m, 4) for m in mean],
            "data.channel_std": [round(s, 4) for s in std],
            "data.kept_decoded": keep,
        },
        per_epoch=per_epoch,
        extra={"classes": listing.classes, "stats": stats, "listing": listing, "held": held},
    )


def check_every_class_held(listing: Listing, held: np.ndarray, fraction: float) -> None:
    """Refuse class folders too small to appear in both splits (DataError)."""
    unseen = [c for i, c in enumerate(listing.classes) if not held[listing.labels == i].any()]
    if unseen:
        shown = ", ".join(unseen[:5]) + (", ..." if len(unseen) > 5 else "")
        raise DataError(
            f"data.path: {len(unseen)} class folder(s) too small to appear in both splits "
            f"({shown}: no validation image at data.validation_fraction {fraction}); add "
            "images to them, drop them, or raise data.validation_fraction"
        )


def decode_splits(
    train_files: pa.Table,
    val_files: pa.Table,
    options: dict[str, Any],
    keep: bool,
    task_cpus: float,
    read_args: dict[str, Any] | None,
) -> tuple[Any, pa.Table, Any, int, int]:
    """(the decoded training images, kept in the object store, or None; the training files,
    only those that decode where they are streamed; the validation images, kept where the
    training images are; the counts of both). A file that does not decode is one line
    (DataError) unless data.on_bad_rows is skip."""
    try:
        with errors_reported_here():
            if keep:
                train = decoded(train_files, options, task_cpus, read_args).materialize()
                settle()
                val = decoded(val_files, options, task_cpus, read_args).materialize()
                return train, train_files, val, train.count(), val.count()
            # Streamed: one pass here finds the files that decode; each epoch reads them anew.
            train_files = good_files(train_files, options, task_cpus, read_args)
            settle()
            val = decoded(val_files, options, task_cpus, read_args)
            return None, train_files, val, train_files.num_rows, val.count()
    except Exception as e:  # a file that does not decode, inside a Ray Data task
        if (failure := task_error(e, "data.path")) is None:
            raise
        raise failure from None


def good_files(
    table: pa.Table, options: dict[str, Any], task_cpus: float, read_args: dict | None
) -> pa.Table:
    """The rows of `table` whose files decode (one decoding pass; the images are dropped)."""
    numbered = table.append_column("index", pa.array(np.arange(table.num_rows)))
    ok = decoded(numbered, options, task_cpus, read_args).select_columns(["index"])
    batches = ok.iter_batches(batch_size=None, batch_format="numpy")
    index = np.concatenate([b["index"] for b in batches] + [np.zeros(0, np.int64)])
    return table.take(np.sort(index))


def package(spec: RunSpec, prepared: Prepared, net: Any) -> tuple[Any, Any, dict[str, str]]:
    """The trained network behind the decoding and normalization it was trained with: it takes
    a DataFrame whose `image` column holds encoded images (bytes) or their paths, and returns
    class names. Three validation images are its input example."""
    from trainyard.pipelines.data.images.serving import ImageClassifier  # noqa: PLC0415 (torch, MLflow: not on the command's start)

    extra, data = prepared.extra, spec.data
    listing, held = extra["listing"], extra["held"]
    example = []
    for i in np.flatnonzero(held)[:: max(1, int(held.sum()) // 3)][:3]:
        with listing.fs.open_input_file(listing.files[i]) as f:
            example.append(f.readall())
    model = ImageClassifier(
        net,
        data.image_size,
        data.mode,
        extra["stats"]["mean"],
        extra["stats"]["std"],
        extra["classes"],
    )
    return model, pd.DataFrame({"image": example}), {"pipeline": "images", "classes": model.classes}


def describe_data(spec: RunSpec) -> None:
    """Nothing beyond the spec."""
    return None


def metric_keys(spec: RunSpec) -> list[str]:
    """The metrics plotted into the run's curves."""
    return ["train_loss", "val_loss", "val_accuracy", "images_per_s", "data_wait_share"]


def figures(spec: RunSpec, prepared: Prepared, net: Any, directory: Path) -> list[Path]:
    """augmented.png, a grid of training images as the first epoch augments them, and
    confusion.png, the confusion matrix of the trained model on the validation images."""
    from trainyard.models.outputs import logits  # noqa: PLC0415 (torch: not on the command's start)

    try:
        import matplotlib
    except ImportError:
        print("trainyard: matplotlib is not installed: no augmented.png or confusion.png")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    extra, per_epoch = prepared.extra, prepared.per_epoch
    classes, stats = extra["classes"], extra["stats"]
    # The first rows of the training split, through the first pass's batch function.
    rows = per_epoch.rows.take_batch(32, batch_format="numpy")
    rows[ROW] = np.arange(len(rows["label"]))
    batch = train_batch(rows, seed=spec.train.seed, pass_number=1, **per_epoch.kwargs)
    images = (
        batch["x"] * np.asarray(stats["std"])[:, None, None]
        + np.asarray(stats["mean"])[:, None, None]
    )
    images = np.clip(images.transpose(0, 2, 3, 1), 0, 1)
    fig, axes = plt.subplots(4, 8, figsize=(8, 4.6))
    for ax, image, label in zip(axes.flat, images, batch["y"], strict=False):
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray")
        ax.set_title(classes[label][:12], fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("training images, epoch 1's augmentation", fontsize=9)
    fig.tight_layout()
    paths = [directory / "augmented.png", directory / "confusion.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    counts = np.zeros((len(classes), len(classes)), dtype=np.int64)
    net = net.eval()
    with torch.no_grad():
        for b in prepared.validation.iter_batches(batch_size=512, batch_format="numpy"):
            predicted = logits(net(torch.from_numpy(b["x"]))).argmax(-1).numpy()
            np.add.at(counts, (b["y"], predicted), 1)
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(counts, cmap="Blues")
    if len(classes) <= 30:
        ax.set_xticks(range(len(classes)), [c[:12] for c in classes], rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), [c[:12] for c in classes], fontsize=7)
        for (i, j), n in np.ndenumerate(counts):
            if n:
                ax.text(
                    j,
                    i,
                    str(n),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if n > counts.max() / 2 else "black",
                )
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"validation: {counts.sum()} images, accuracy {accuracy:.4f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def cache_inputs(spec: RunSpec) -> dict[str, Any]:
    """The data spec, the seed, the files' fingerprint, and whether the decoded images are
    kept (data.keep_decoded, or the object store's size decides)."""
    listing = Listing(spec.data)
    return {
        "pipeline": "images",
        "data": asdict(spec.data),
        "seed": spec.train.seed,
        "files": fingerprint(listing.files, listing.fs),
        "keep_decoded": keep_decoded(spec.data, len(listing.files)),
    }


def model_facts(spec: RunSpec) -> None:
    """The data decide the model's shape: known once they are read."""
    return None
