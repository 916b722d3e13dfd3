"""predict: batch inference with a logged model over many inputs. A single process looping over
`pyfunc.predict` in batches, a ThreadPoolExecutor running the same batches, and `trainyard
predict` (Ray Data: a pool of actors that each load the model once), each reading the inputs
and writing the predictions to Parquet. Two models: the images pipeline's ResNet
(configs/digits-images.yaml: 16×16 greyscale, depth 10, width 16) over PNG files, and the
tabular MLP (64 features, hidden 128 and 64) over rows of Parquet files (400,000, and 4,000,000
where start-up is amortized). Besides the whole jobs, the steady state: one actor's rows/s
against the single-threaded process's predict calls alone. Untrained weights: the speed is the
same."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from trainyard.models import TabularPredictor, mlp, resnet
from trainyard.pipelines import tracking
from trainyard.pipelines.bench.core import Case, alternate, timed
from trainyard.pipelines.data.images.files import digits_images
from trainyard.pipelines.data.images.serving import ImageClassifier
from trainyard.pipelines.data.tabular.serving import RawRowsModel
from trainyard.pipelines.jobs import predict

IMAGE_BATCH = 64
ROW_BATCH = 4096
FEATURES = [f"f{i}" for i in range(64)]
CLASSES = list(range(10))


def logged_models(uri: str, example_png: bytes) -> dict[str, str]:
    """The two models, logged (and signed) as trainyard logs them; their URIs by kind."""
    torch.manual_seed(0)
    image = ImageClassifier(
        resnet(in_channels=1, num_classes=10, depth=10, width=16),
        [16, 16],
        "L",
        [0.3],
        [0.3],
        [str(c) for c in CLASSES],
    )
    table = RawRowsModel(
        TabularPredictor(mlp(64, 10, (128, 64)), torch.zeros(64), torch.ones(64), classes=CLASSES),
        FEATURES,
    )
    rows = pd.DataFrame(np.zeros((3, 64), dtype=np.float32), columns=FEATURES)
    with tracking.run(uri, "trainyard-bench", "bench-predict-models") as run:
        return {
            "images": tracking.log_model(
                uri,
                run.id,
                image,
                pd.DataFrame({"image": [example_png] * 3}),
                {"pipeline": "images", "classes": image.classes},
            ),
            "tabular": tracking.log_model(
                uri, run.id, table, rows, {"pipeline": "tabular", "classes": CLASSES}
            ),
        }


def image_inputs(directory: Path, n: int) -> list[Path]:
    """`n` PNG files (the digits', cycled) copied into `directory`."""
    sources = sorted(digits_images().glob("*/*.png"))
    directory.mkdir()
    paths = [directory / f"{i:06d}.png" for i in range(n)]
    for i, path in enumerate(paths):
        shutil.copyfile(sources[i % len(sources)], path)
    return paths


def table_inputs(directory: Path, n: int, files: int = 8) -> list[Path]:
    """`n` rows of random features in `files` Parquet files."""
    directory.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i, part in enumerate(np.array_split(np.arange(n), files)):
        x = rng.normal(size=(len(part), 64)).astype(np.float32)
        paths.append(directory / f"part-{i:02d}.parquet")
        pq.write_table(pa.table(dict(zip(FEATURES, x.T, strict=True))), paths[-1])
    return paths


def one_thread(fn: Any) -> Any:
    """`fn()` with torch on one thread: what each of trainyard's actors has. Twice this rate is
    the most two cores could give with no start-up and no overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def by_hand(model_uri: str, kind: str, inputs: list[Path], out: Path, pool: int | None) -> float:
    """What a user writes without Ray: load the model, read batches, predict them (in this
    thread, or `pool` threads), write the predictions to one Parquet file. Returns the seconds
    spent in `predict` calls (the steady state, without loading, reading or writing)."""
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(model_uri)
    if kind == "images":
        batches = [inputs[i : i + IMAGE_BATCH] for i in range(0, len(inputs), IMAGE_BATCH)]

        def one(paths: list[Path]) -> tuple[np.ndarray, float]:
            images = pd.DataFrame({"image": [p.read_bytes() for p in paths]})
            began = time.perf_counter()
            return np.asarray(model.predict(images)), time.perf_counter() - began
    else:
        frames = [pq.read_table(p).to_pandas() for p in inputs]
        batches = [f.iloc[i : i + ROW_BATCH] for f in frames for i in range(0, len(f), ROW_BATCH)]

        def one(rows: pd.DataFrame) -> tuple[np.ndarray, float]:
            began = time.perf_counter()
            return np.asarray(model.predict(rows)).argmax(1), time.perf_counter() - began

    if pool:
        with ThreadPoolExecutor(pool) as threads:
            results = list(threads.map(one, batches))
    else:
        results = [one(b) for b in batches]
    pq.write_table(pa.table({"prediction": np.concatenate([r for r, _ in results])}), out)
    return sum(seconds for _, seconds in results)


def run(quick: bool, cores: int, **_: Any) -> list[Case]:
    repeats = 1 if quick else 3
    jobs = [("images", 128), ("tabular", 4_000)]
    if not quick:
        jobs = [("images", 16_384), ("tabular", 400_000), ("tabular", 4_000_000)]
    scratch = Path(tempfile.mkdtemp(prefix="trainyard-bench-predict-"))
    try:
        uri = f"sqlite:///{scratch / tracking.DEFAULT_DB}"  # its models and runs stay in here
        example = next(iter(sorted(digits_images().glob("*/*.png")))).read_bytes()
        # Fetched once: every contender loads the model from the same local directory.
        uris = {
            kind: str(tracking.fetch_model(model, uri, scratch / f"model-{kind}"))
            for kind, model in logged_models(uri, example).items()
        }
        cases = []
        for kind, size in jobs:
            folder = scratch / f"{kind}-{size}"
            if kind == "images":
                data = image_inputs(folder, size)
            else:
                data = table_inputs(folder, size)
            cases += job_cases(kind, size, data, uris[kind], uri, scratch, quick, cores, repeats)
            shutil.rmtree(folder)
        return cases
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def job_cases(
    kind: str,
    size: int,
    data: list[Path],
    model: str,
    uri: str,
    scratch: Path,
    quick: bool,
    cores: int,
    repeats: int,
) -> list[Case]:
    """The whole job (load, read, predict, write) by each contender, and the steady state of
    one actor against one single-threaded process's predict calls."""
    unit = "images/s" if kind == "images" else "rows/s"
    outs = (scratch / f"out-{kind}-{size}-{i}" for i in range(1_000_000))
    steady: dict[str, list[float]] = {
        "pyfunc.predict on 1 thread: its predict calls": [],
        "trainyard predict: an actor, first batch to last": [],
        "trainyard predict: an actor, while predicting": [],
    }
    by_hand_steady, ours_steady, ours_busy = steady

    def mine(pool: int | None) -> None:
        by_hand(model, kind, data, next(outs), pool)

    def single() -> None:
        seconds = one_thread(lambda: by_hand(model, kind, data, next(outs), None))
        steady[by_hand_steady].append(size / seconds)

    def ours() -> None:
        args = predict_args(model, data[0].parent, next(outs), uri)
        if quick:  # a smoke run, maybe on a shared cluster: one actor
            args.workers = 1
        summary = predict.predict(args)
        steady[ours_steady].append(summary["actor_rows_per_s"])
        steady[ours_busy].append(summary["busy_rows_per_s"])

    contenders = {"pyfunc.predict, one process": lambda: mine(None)}
    large = size > 1_000_000  # only the two that matter: it takes minutes
    if not large:
        contenders[f"ThreadPoolExecutor({cores})"] = lambda: mine(cores)
    contenders["one process, torch on 1 thread"] = single
    contenders["trainyard predict (Ray Data actors)"] = ours
    seconds = alternate(
        {c: lambda f=f: timed(f) for c, f in contenders.items()},
        1 if large and not quick else repeats,
    )
    reference = next(iter(contenders))
    name = f"{kind}: batch inference" + (f", {size:,} rows" if large else "")
    whole = Case("predict", name, unit, True, reference)
    whole.values = {c: [size / s for s in v] for c, v in seconds.items()}
    files = "PNG files" if kind == "images" else "rows in 8 Parquet files"
    batch = IMAGE_BATCH if kind == "images" else ROW_BATCH
    whole.notes.append(
        f"{size} {files}, batches of {batch}; each contender loads the model, reads the inputs "
        f"and writes the predictions to Parquet. trainyard predict runs its default pool (one "
        f"actor per CPU, {cores} here, each with torch on 1 thread): at best {cores}x the "
        "1-thread process, less start-up"
    )
    cases = [whole]
    if not large:
        state = Case("predict", f"{kind}: steady state per actor", unit, True, by_hand_steady)
        # the warm-up round's values are left out, as alternate leaves out its times
        state.values = {c: v[-repeats:] for c, v in steady.items()}
        state.notes.append(
            "rows/s of one actor of trainyard's pool against the single-threaded process's "
            "predict calls alone (no loading, reading or writing): from the actor's first "
            "batch to its last (waits for input and output included), and while it predicted"
        )
        cases.append(state)
    return cases


def predict_args(model: str, data: Path, out: Path, uri: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    return parser.parse_args([model, str(data), "--out", str(out), "--tracking-uri", uri])
