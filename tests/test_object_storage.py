"""Object storage for real: an S3 endpoint on loopback (moto's ThreadedMotoServer, started by
conftest before the cluster) reached as users reach S3 or MinIO, through AWS_ENDPOINT_URL and
keys in the environment of every node. The data, the checkpoints and the preprocessing cache
live on s3://; a run trains, fails and is restarted by Ray Train from its S3 checkpoint, is
resumed on another number of workers by --resume, reads its prepared data from the S3 cache,
and its model predicts from s3:// to s3://; doctor's storage check passes on it."""

from __future__ import annotations

import json

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from conftest import train_command as train
from mlflow.tracking import MlflowClient

from trainyard.pipelines.cli import main
from trainyard.pipelines.data.tabular.rows import digits_table

EXPERIMENT = "test-object-storage"


def test_a_run_on_object_storage_trains_resumes_caches_and_predicts(
    ray_cluster, s3_endpoint, tracking_uri, tmp_path, monkeypatch, capsys
):
    import boto3

    s3 = boto3.client("s3")  # (the endpoint from AWS_ENDPOINT_URL, as pyarrow's)
    for bucket in ("ty-data", "ty-runs", "ty-out"):
        s3.create_bucket(Bucket=bucket)
    fs, _ = pafs.FileSystem.from_uri("s3://ty-data")  # (as trainyard opens s3:// paths)
    table = digits_table()
    for i in range(3):  # three Parquet files of the digits
        part = table.iloc[i::3].reset_index(drop=True)
        pq.write_table(pa_table(part), f"ty-data/digits/part-{i}.parquet", filesystem=fs)
    data, storage, name = "s3://ty-data/digits/*.parquet", "s3://ty-runs/results", "on-s3"

    def argv(epochs: int, workers: int, *extra: str) -> list[str]:
        sets = [
            f"data.path={data}",
            f"scaling.storage_path={storage}",
            f"scaling.num_workers={workers}",
            f"train.epochs={epochs}",
            f"tracking.run_name={name}",
            f"tracking.experiment={EXPERIMENT}",
            "train.log_every_steps=1000",
            "scaling.max_failures=1",
        ]
        summary = ["--summary", str(tmp_path / f"{name}.json")]
        return ["configs/digits.yaml", *summary, *[a for s in sets for a in ("--set", s)], *extra]

    # 1. Trains on 2 workers; fails in epoch 2 once and Ray Train restarts it from epoch 1's
    # checkpoint, read back from S3.
    monkeypatch.setenv("TRAINYARD_INJECT_FAILURE", f"{tmp_path / 'marker'}:2")
    assert train(argv(2, 2)) == 0
    monkeypatch.delenv("TRAINYARD_INJECT_FAILURE")
    assert (tmp_path / "marker").read_text() == "1"
    written = capsys.readouterr().out
    assert "data cache: preprocessed data written to" in written and "s3://ty-runs" in written
    # 2. Resumed by --resume for an epoch more: its checkpoint found and read on S3, the
    # prepared data read from the S3 cache; then on 1 worker (the same global batches).
    assert train([*argv(3, 2), "--resume", name]) == 0
    said = capsys.readouterr().out
    assert f"continuing {name} after epoch 2 from s3://ty-runs/results/{name}/" in said
    assert "data cache: preprocessed data from" in said
    assert train([*argv(4, 1), "--resume", name]) == 0
    assert f"continuing {name} after epoch 3" in capsys.readouterr().out
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id],
        f"tags.`ray.train.run_name` = '{name}'",
    )
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert history[-1].value > 0.9
    assert run.data.tags["trainyard.restarts"] == "3"  # (the failure, then each --resume)
    summary = json.loads((tmp_path / f"{name}.json").read_text())
    assert summary["checkpoint"].startswith("s3://ty-runs/results/on-s3/checkpoint_")
    # 3. Its model predicts the S3 files into S3, in the input's order.
    out = "s3://ty-out/predictions"
    assert main(["predict", run.info.run_id, data, "--out", out, "--keep", "label"]) == 0
    predicted = pads.dataset("ty-out/predictions", filesystem=fs, format="parquet").to_table()
    assert predicted.num_rows == len(table)
    labels, guesses = predicted["label"].to_pylist(), predicted["prediction"].to_pylist()
    assert sum(a == b for a, b in zip(labels, guesses, strict=True)) / len(labels) > 0.9
    # 4. doctor's storage check writes on the head node and reads on every node.
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"pipeline: tabular\ndata: {{path: {data}}}\nscaling: {{storage_path: {storage}}}\n"
    )
    assert main(["doctor", str(spec)]) in (0, None)
    lines = capsys.readouterr().out
    assert f"{storage}: written on the head node, read on all 3" in lines, lines


def pa_table(frame):
    import pyarrow as pa

    return pa.Table.from_pandas(frame, preserve_index=False)
