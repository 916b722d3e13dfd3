"""predict: batch inference with a logged model over many inputs. A single process looping over
`pyfunc.predict` in batches, a ThreadPoolExecutor running the same batches, and `trainyard
predict` (Ray Data: a pool of actors that each load the model once), each reading the inputs
and writing the predictions to Parquet. Two models: the images pipeline's ResNet
(configs/digits-images.yaml: 16×16 greyscale, depth 10, width 16) over PNG files, and the
tabular MLP (64 features, hidden 128 and 64) over rows of Parquet files. Untrained weights: the
speed is the same."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from trainyard.pipelines.bench.core import Case, alternate, timed

IMAGE_BATCH = 64
ROW_BATCH = 4096
FEATURES = [f"f{i}" for i in range(64)]
CLASSES = list(range(10))


def logged_models(uri: str, example_png: bytes) -> dict[str, str]:
    """The two models, logged (and signed) as trainyard logs them; their URIs by kind."""
    from trainyard.models import TabularPredictor, mlp, resnet
    from trainyard.pipelines import tracking
    from trainyard.pipelines.data.serving import ImageClassifier, RawRowsModel

    torch.manual_seed(0)
    run_id = tracking.start_run(uri, "trainyard-bench", "bench-predict-models", {}, "", {})
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
    uris = {
        "images": tracking.log_model(
            uri,
            run_id,
            image,
            pd.DataFrame({"image": [example_png] * 3}),
            {"pipeline": "images", "classes": image.classes},
        ),
        "tabular": tracking.log_model(
            uri, run_id, table, rows, {"pipeline": "tabular", "classes": CLASSES}
        ),
    }
    tracking.end_run(uri, run_id)
    return uris


def image_inputs(directory: Path, n: int) -> list[Path]:
    """`n` PNG files (the digits', cycled) copied into `directory`."""
    from trainyard.pipelines.data.images import digits_images

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


def one_thread(fn: Any) -> None:
    """`fn()` with torch on one thread: what each of trainyard's actors has. Twice this rate is
    the most two cores could give with no start-up and no overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fn()
    finally:
        torch.set_num_threads(threads)


def by_hand(model_uri: str, kind: str, inputs: list[Path], out: Path, pool: int | None) -> None:
    """What a user writes without Ray: load the model, read batches, predict them (in this
    thread, or `pool` threads), write the predictions to one Parquet file."""
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(model_uri)
    if kind == "images":
        batches = [inputs[i : i + IMAGE_BATCH] for i in range(0, len(inputs), IMAGE_BATCH)]

        def one(paths: list[Path]) -> np.ndarray:
            images = pd.DataFrame({"image": [p.read_bytes() for p in paths]})
            return np.asarray(model.predict(images))
    else:
        frames = [pq.read_table(p).to_pandas() for p in inputs]
        batches = [f.iloc[i : i + ROW_BATCH] for f in frames for i in range(0, len(f), ROW_BATCH)]

        def one(rows: pd.DataFrame) -> np.ndarray:
            return np.asarray(model.predict(rows)).argmax(1)

    if pool:
        with ThreadPoolExecutor(pool) as threads:
            results = list(threads.map(one, batches))
    else:
        results = [one(b) for b in batches]
    pq.write_table(pa.table({"prediction": np.concatenate(results)}), out)


def run(quick: bool, cores: int, **_: Any) -> list[Case]:
    from trainyard.pipelines import tracking
    from trainyard.pipelines.data.images import digits_images
    from trainyard.pipelines.jobs import predict

    repeats = 1 if quick else 3
    sizes = {"images": 128 if quick else 16384, "tabular": 4_000 if quick else 400_000}
    scratch = Path(tempfile.mkdtemp(prefix="trainyard-bench-predict-"))
    try:
        uri = f"sqlite:///{scratch / tracking.DEFAULT_DB}"  # its models and runs stay in here
        example = next(iter(sorted(digits_images().glob("*/*.png")))).read_bytes()
        # Fetched once: every contender loads the model from the same local directory.
        uris = {
            kind: str(tracking.fetch_model(model, uri, scratch / f"model-{kind}"))
            for kind, model in logged_models(uri, example).items()
        }
        inputs = {
            "images": image_inputs(scratch / "images", sizes["images"]),
            "tabular": table_inputs(scratch / "tabular", sizes["tabular"]),
        }
        outs = iter(range(1_000_000))
        cases = []
        for kind, unit in (("images", "images/s"), ("tabular", "rows/s")):
            data = inputs[kind]

            def ours(kind: str = kind) -> None:
                args = predict_args(uris[kind], scratch / kind, scratch / f"out-{next(outs)}", uri)
                if quick:  # a smoke run, maybe on a shared cluster: one actor
                    args.workers = 1
                predict.predict(args)

            contenders = {
                "pyfunc.predict, one process": lambda k=kind, d=data: by_hand(
                    uris[k], k, d, scratch / f"out-{next(outs)}.parquet", None
                ),
                f"ThreadPoolExecutor({cores})": lambda k=kind, d=data: by_hand(
                    uris[k], k, d, scratch / f"out-{next(outs)}.parquet", cores
                ),
                "one process, torch on 1 thread": lambda k=kind, d=data: one_thread(
                    lambda: by_hand(uris[k], k, d, scratch / f"out-{next(outs)}.parquet", None)
                ),
                "trainyard predict (Ray Data actors)": ours,
            }
            seconds = alternate({c: lambda f=f: timed(f) for c, f in contenders.items()}, repeats)
            values = {c: [sizes[kind] / s for s in v] for c, v in seconds.items()}
            case = Case(
                "predict", f"{kind}: batch inference", unit, True, "pyfunc.predict, one process"
            )
            case.values = values
            case.notes.append(
                f"{sizes[kind]} {'PNG files' if kind == 'images' else 'rows in 8 Parquet files'}"
                f", batches of {IMAGE_BATCH if kind == 'images' else ROW_BATCH}; each contender "
                "loads the model, reads the inputs and writes the predictions to Parquet. "
                f"trainyard predict runs its default pool (one actor per CPU, {cores} here, each "
                f"with torch on 1 thread): at best {cores}x the 1-thread process, less start-up"
            )
            cases.append(case)
        return cases
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def predict_args(model: str, data: Path, out: Path, uri: str) -> argparse.Namespace:
    from trainyard.pipelines.jobs import predict

    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    return parser.parse_args([model, str(data), "--out", str(out), "--tracking-uri", uri])
