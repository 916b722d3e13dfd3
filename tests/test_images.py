"""The images pipeline: class folders decoded once by Ray Data, augmented every epoch, a ResNet.

Pure functions first (decoding mixed files, the seeded crop and flip, the split, the model),
then the pipeline on the local multi-node cluster: bad files, configs/digits-images.yaml to its
accuracy target, an interrupted run that streams from the files and still ends bit for bit
where the uninterrupted one did, and the logged model predicting PNG bytes in a fresh process.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import pyfunc_elsewhere, train
from PIL import Image

from trainyard.pipelines.data.arrays import crop_flip, decode_image, normalize
from trainyard.pipelines.data.images.files import held_out

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "digits-images.yaml"


def encoded(mode: str, size: tuple[int, int], fmt: str, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}.get(mode, 1)
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    if mode == "P":
        image = image.convert("P")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


MIXED = {  # class folder / file: (mode, (width, height), format)
    "cat/a.png": ("RGBA", (20, 30), "PNG"),
    "cat/b.jpg": ("L", (8, 8), "JPEG"),
    "cat/c.gif": ("P", (12, 12), "GIF"),
    "cat/d.PNG": ("RGB", (12, 12), "PNG"),
    "dog/a.bmp": ("RGB", (50, 10), "BMP"),
    "dog/b.png": ("LA", (16, 16), "PNG"),
    "dog/c.webp": ("RGB", (9, 31), "WEBP"),
    "dog/d.tiff": ("L", (12, 40), "TIFF"),
}


def test_mixed_sizes_and_modes_decode_to_one_shape():
    for mode, size, fmt in MIXED.values():
        data = encoded(mode, size, fmt)
        assert decode_image(data, (12, 16), "RGB").shape == (12, 16, 3)
        grey = decode_image(data, (12, 16), "L")
        assert grey.shape == (12, 16, 1) and grey.dtype == np.uint8
    same = encoded("RGB", (16, 12), "PNG")  # already the size: the pixels as they are
    assert np.array_equal(
        decode_image(same, (12, 16), "RGB"), np.asarray(Image.open(io.BytesIO(same)))
    )
    with pytest.raises(OSError):  # PIL.UnidentifiedImageError
        decode_image(b"\x89PNG\r\n\x1a\n not really", (12, 16), "RGB")


def test_crop_and_flip_draw_per_image_and_pass():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    ids = np.arange(100, 164)
    first = crop_flip(images, ids, 2, True, seed=0, pass_number=1)
    assert first.shape == images.shape and first.dtype == np.uint8
    # The same pass draws the same, whatever batch an image lands in.
    assert np.array_equal(first, crop_flip(images, ids, 2, True, 0, 1))
    assert np.array_equal(first[10:20], crop_flip(images[10:20], ids[10:20], 2, True, 0, 1))
    # Another pass (or seed) draws anew: most images come out differently.
    for other in (crop_flip(images, ids, 2, True, 0, 2), crop_flip(images, ids, 2, True, 1, 1)):
        changed = (other != first).reshape(len(ids), -1).any(axis=1)
        assert changed.mean() > 0.7
    # Flip only: each image is itself or its mirror, about half of them mirrored.
    flipped = crop_flip(images, ids, 0, True, 0, 1)
    mirrored = [np.array_equal(f, i[:, ::-1]) for f, i in zip(flipped, images, strict=True)]
    assert all(m or np.array_equal(f, i) for m, f, i in zip(mirrored, flipped, images, strict=True))
    assert 16 < sum(mirrored) < 48
    x = normalize(first, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert x.shape == (64, 3, 8, 8) and x.dtype == np.float32
    assert x.min() >= -2.0 and x.max() <= 2.0


def mirror(batch, rng):
    """A user's augmentation (data.augment: test_images:mirror)."""
    return {"x": batch["x"][:, :, ::-1], "y": batch["y"]}


def to_float(batch, rng):
    return {"x": batch["x"] / 255.0, "y": batch["y"]}


def test_a_users_augmentation_gets_uint8_images_and_normalization_follows():
    from trainyard.pipelines.data.augment import ROW
    from trainyard.pipelines.data.images.pipeline import train_batch

    images = np.random.default_rng(0).integers(0, 256, (4, 6, 5, 1), dtype=np.uint8)
    batch = {"image": images, "label": np.arange(4), ROW: np.arange(4)}
    stats = {"mean": [0.5], "std": [0.5]}
    out = train_batch(batch, 0, 1, f"{__name__}:mirror", **stats)
    assert np.array_equal(out["x"], normalize(images[:, :, ::-1], **stats))
    with pytest.raises(TypeError, match="must return x as uint8 images"):
        train_batch(batch, 0, 1, f"{__name__}:to_float", **stats)


def test_split_is_stratified_and_follows_the_path_below_the_root():
    relative = [f"{c}/{i}.png" for c in ("a", "b", "c") for i in range(50)]
    labels = np.repeat([0, 1, 2], 50)
    held = held_out(relative, labels, 0.2, seed=0)
    assert [int(held[labels == k].sum()) for k in range(3)] == [10, 10, 10]
    assert np.array_equal(held, held_out(relative, labels, 0.2, seed=0))
    assert not np.array_equal(held, held_out(relative, labels, 0.2, seed=1))
    # Every class keeps a training file, however high the fraction.
    assert not held_out(["a/1.png", "b/1.png"], np.array([0, 1]), 0.9, seed=0).any()
    # A file's side depends on its own path, not on which other files are there.
    subset = held_out(relative[:100], labels[:100], 0.2, seed=0)
    assert (subset == held[:100]).mean() > 0.9


@pytest.mark.parametrize("depth", [10, 18])
def test_resnet_shapes_and_channels_last(depth):
    from trainyard.models import resnet

    net = resnet(in_channels=3, num_classes=7, depth=depth, width=8)
    x = torch.randn(4, 3, 24, 20)
    out = net(x)
    assert out.shape == (4, 7)
    net = net.to(memory_format=torch.channels_last)
    assert torch.allclose(net(x.contiguous(memory_format=torch.channels_last)), out, atol=1e-5)


# --- on the cluster -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The built-in data's cache for this module (written once, by the first run)."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["TRAINYARD_CACHE"] = str(path)
    yield path
    os.environ.pop("TRAINYARD_CACHE", None)


def write_folders(root: Path, bad: bool) -> Path:
    for name, (mode, size, fmt) in MIXED.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(encoded(mode, size, fmt, seed=len(name)))
    if bad:
        (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def test_a_corrupt_file_stops_the_run_naming_it_or_is_skipped(ray_cluster, tmp_path, capsys):
    from conftest import train_command as main

    from trainyard.pipelines.config.spec import RunSpec
    from trainyard.pipelines.data.images import pipeline as images

    root = write_folders(tmp_path / "pets", bad=True)
    config = tmp_path / "pets.yaml"
    config.write_text(
        f"pipeline: images\ndata: {{path: {root}, image_size: [12, 16], "
        "validation_fraction: 0.5}\n"
        "model: {name: resnet, depth: 10, width: 4}\n"
        "train: {epochs: 1, batch_size: 2}\nscaling: {num_workers: 1}\n"
    )
    assert main([str(config), "--set", f"scaling.storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(root / "dog" / "broken.png") in err[0], err
    assert "data.on_bad_rows=skip" in err[0]

    for keep in (True, False):  # decoded once and kept, or streamed from the files
        spec = RunSpec.from_dict(
            {
                "pipeline": "images",
                "data": {
                    "path": str(root),
                    "image_size": [12, 16],
                    "validation_fraction": 0.5,
                    "on_bad_rows": "skip",
                    "keep_decoded": keep,
                },
                "train": {"batch_size": 2},
                "scaling": {"num_workers": 1},
            }
        )
        data = images.prepare(spec, task_cpus=0.5, num_workers=1, rows_per_step=2)
        assert (data.num_train, data.num_validation) == (4, 4)
        assert data.params["data.skipped"] == 1
        assert "skipped 1 image(s) that do not decode" in capsys.readouterr().out
        val = data.validation.take_batch(8, batch_format="numpy")
        assert val["x"].shape == (4, 3, 12, 16) and sorted(val["y"]) == [0, 0, 1, 1]
        assert data.facts["in_shape"] == [3, 12, 16] and data.extra["classes"] == ["cat", "dog"]


@pytest.fixture(scope="module")
def digits_images(ray_cluster, tracking_uri, cache, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("digits-images")
    return train(CONFIG, out, "tracking.experiment=test-images", "tracking.run_name=straight")


def test_digits_images_reach_the_target_with_its_pictures_in_mlflow(digits_images, tracking_uri):
    from mlflow.tracking import MlflowClient

    assert digits_images["metrics"]["val_accuracy"] >= 0.97
    client = MlflowClient(tracking_uri)
    run = client.get_run(digits_images["run_id"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"augmented.png", "confusion.png", "curves.png"} <= artifacts
    assert run.data.params["data.classes"] == ",".join(map(str, range(10)))
    assert run.data.params["data.kept_decoded"] == "True"
    assert run.data.metrics["images_per_s"] > 0
    assert 0 <= run.data.metrics["data_wait_share"] < 1


def test_an_interrupted_streamed_run_ends_where_the_straight_one_did(
    digits_images, tracking_uri, tmp_path, monkeypatch
):
    """Decoded again from the files every epoch (keep_decoded false), failing after epoch 3
    and resumed by Ray Train from its checkpoint: the same augmentation draws, the same batches,
    the same weights bit for bit as the uninterrupted run that kept the decoded images."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("TRAINYARD_INJECT_FAILURE", f"{tmp_path / 'marker'}:3")
    resumed = train(
        CONFIG,
        tmp_path,
        "tracking.experiment=test-images",
        "tracking.run_name=interrupted",
        "data.keep_decoded=false",
        "scaling.max_failures=1",
    )
    client = MlflowClient(tracking_uri)
    a = client.get_run(digits_images["run_id"]).data
    b = client.get_run(resumed["run_id"]).data
    assert b.tags["trainyard.restarts"] == "1" and b.params["data.kept_decoded"] == "False"
    assert a.tags["param_digests"] == b.tags["param_digests"]
    assert digits_images["metrics"] == resumed["metrics"]


def test_predict_classifies_image_files_as_the_model_does(
    digits_images, tracking_uri, cache, tmp_path, capsys
):
    """`trainyard predict` over a folder of PNGs with one broken file: left out and counted
    with --on-bad-rows skip, one line naming it without; the rest, in order, classified as
    pyfunc.predict classifies their bytes."""
    import json
    import shutil

    import mlflow
    import pandas as pd

    from trainyard.pipelines import cli

    images = tmp_path / "images"
    images.mkdir()
    for i, f in enumerate(sorted((cache / "digits-images").glob("*/*.png"))[::9]):
        shutil.copy(f, images / f"{i:04d}-{f.parent.name}.png")
    (images / "0100-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    files = sorted(images.glob("*.png"))
    args = ["predict", digits_images["model_uri"], str(images), "--batch-size", "16"]
    assert cli.main([*args, "--out", str(tmp_path / "refused")]) == 2
    # trainyard's one line, last (Ray's own log lines, streamed from its processes, may precede it)
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"trainyard: error: DATA: {images}/0100-broken.png does not decode")
    summary = tmp_path / "summary.json"
    skip = ["--on-bad-rows", "skip", "--summary", str(summary), "--probabilities"]
    assert cli.main([*args, "--out", str(tmp_path / "out"), *skip]) == 0
    assert json.loads(summary.read_text())["skipped"] == 1
    out = pd.read_parquet(tmp_path / "out")
    good = [f for f in files if "broken" not in f.name]
    assert out["path"].tolist() == [str(f) for f in good]
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(digits_images["model_uri"])
    expected = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in good]}))
    assert out["prediction"].tolist() == list(expected)
    probabilities = out[[f"probability_{c}" for c in range(10)]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-6)
    truth = [f.stem.split("-")[1] for f in good]
    assert np.mean(out["prediction"].to_numpy() == np.asarray(truth)) > 0.95
    # The same images as a table of their bytes, an id kept beside each prediction: the
    # broken row is left out and the ids stay with their rows.
    table = tmp_path / "images.parquet"
    ids = [f"img-{i}" for i in range(len(files))]
    pd.DataFrame({"id": ids, "image": [f.read_bytes() for f in files]}).to_parquet(table)
    from_table = tmp_path / "from-table"
    args = [*args[:2], str(table), "--keep", "id", "--on-bad-rows", "skip", "--format", "csv"]
    assert cli.main([*args, "--out", str(from_table)]) == 0
    out = pd.concat([pd.read_csv(p) for p in sorted(from_table.iterdir())])
    assert out["id"].tolist() == [
        i for i, f in zip(ids, files, strict=True) if "broken" not in f.name
    ]
    assert out["prediction"].tolist() == [int(c) for c in expected]
    # pyfunc.predict on such tables as pandas reads them (PNG bytes from Parquet, paths from a
    # CSV), in a fresh process elsewhere: the classes trainyard predict wrote, by their names.
    assert all(isinstance(name, str) for name in expected)
    pd.DataFrame({"image": [f.read_bytes() for f in good]}).to_parquet(tmp_path / "good.parquet")
    pd.DataFrame({"path": [str(f) for f in good]}).to_csv(tmp_path / "paths.csv", index=False)
    reads = [
        f"pd.read_parquet({str(tmp_path / 'good.parquet')!r})",
        f"pd.read_csv({str(tmp_path / 'paths.csv')!r})",
    ]
    for names in pyfunc_elsewhere(tracking_uri, digits_images["model_uri"], reads, tmp_path):
        assert names == list(expected)


def test_resnet18_gpu_config_runs_its_path_shrunk_to_cpu(digits_images, tracking_uri, tmp_path):
    """The GPU config as written, with the width, budget and device shrunk for this machine:
    epochs of a set number of steps, streaming on across passes of augmented images."""
    from mlflow.tracking import MlflowClient

    summary = train(
        ROOT / "configs" / "images-resnet18.yaml",
        tmp_path,
        "model.width=4",
        "train.batch_size=32",
        "train.epochs=2",
        "train.steps_per_epoch=12",
        "train.compile=false",
        "amp.mode=auto",
        "scaling.use_gpu=false",
        "scaling.num_workers=2",
        "tracking.log_model=false",
        "tracking.experiment=test-images-resnet18",
    )
    run = MlflowClient(tracking_uri).get_run(summary["run_id"]).data
    assert run.params["model.depth"] == "18" and run.params["data.mode"] == "RGB"
    # A pass is 1437 // 2 // 32 = 22 steps a rank: 24 are a pass and a bit of the next.
    assert run.tags["trainyard.steps_per_rank"] == "24,24"
