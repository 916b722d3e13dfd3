"""The text pipeline end to end on the local 3-node Ray cluster with a real MLflow store:
windows that never cross the split, the tiny config training (loss falls, one run, tokens/s,
every worker the same number of steps), text sampled back from MLflow, and the gpt2-small
config's path (token budget, gradient accumulation) shrunk to run on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import pyfunc_elsewhere, train
from mlflow.tracking import MlflowClient
from shared_runs import SMALL_CORPUS, TEXT, TEXT_SPEC

from trainyard.pipelines import cli
from trainyard.pipelines.config.spec import RunSpec
from trainyard.pipelines.data.text.pipeline import build_datasets, split_files

ROOT = Path(__file__).resolve().parent.parent


def test_windows_never_cross_the_split(ray_cluster, tmp_path):
    # File i holds one byte value (40 + i), so every token tells which file it came from.
    for i in range(60):
        (tmp_path / f"f{i:02d}.txt").write_bytes(bytes([40 + i]) * (200 + 7 * i))
    spec = RunSpec.from_dict(
        {
            "pipeline": "text",
            "data": {"path": str(tmp_path), "validation_fraction": 0.2},
            "model": {"name": "gpt", "size": "tiny", "context": 16},
            "train": {"batch_size": 8},
        }
    )
    data = build_datasets(spec, 0.5, 2, 4)
    files = sorted(str(p) for p in tmp_path.iterdir())
    train_files, val_files = split_files(str(tmp_path), files, 0.2, 0)
    value = {f: 40 + int(Path(f).stem[1:]) for f in files}
    seen = {}
    for side, ds in (("train", data.train), ("validation", data.validation)):
        batch = ds.take_batch(100_000)
        assert batch["x"].shape[1] == 16
        np.testing.assert_array_equal(batch["x"][:, 1:], batch["y"][:, :-1])
        seen[side] = set(np.unique(np.concatenate([batch["x"], batch["y"]], axis=None)).tolist())
    assert seen["train"] == {value[f] for f in train_files}
    assert seen["validation"] == {value[f] for f in val_files}
    assert data.num_train > 0 and data.num_validation > 0


def cli_main(args: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def tiny_run(text_run) -> dict:
    """The tiny config, shrunk: 3 epochs of 12 steps (tests/shared_runs.py)."""
    return text_run


def test_tiny_config_trains_loss_falls_one_run_with_tokens_per_second(tiny_run, tracking_uri):
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("test-gpt-tiny")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [tiny_run["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED"
    val = sorted(client.get_metric_history(run.info.run_id, "val_loss"), key=lambda m: m.step)
    train = sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)
    assert [m.step for m in val] == [1, 2, 3]
    assert val[-1].value < val[0].value and train[-1].value < train[0].value
    assert val[-1].value < np.log(256)  # better than knowing nothing
    metrics = run.data.metrics
    assert metrics["tokens_per_s"] > 0
    assert metrics["tokens_per_s"] == pytest.approx(metrics["samples_per_s"] * 64)
    assert "mfu" not in metrics  # a CPU has no known peak
    entropy = float(run.data.params["data.unigram_entropy"])
    assert 3.0 < entropy < 5.5
    assert metrics["val_loss_vs_unigram"] == pytest.approx(metrics["val_loss"] / entropy, 1e-4)
    assert metrics["val_bits_per_byte"] == pytest.approx(metrics["val_loss"] / np.log(2))
    assert run.data.params["plan.steps_per_epoch"] == "12"


def test_tiny_config_every_worker_ran_the_same_steps_on_two_nodes(tiny_run, tracking_uri):
    tags = MlflowClient(tracking_uri).get_run(tiny_run["run_id"]).data.tags
    assert tags["trainyard.steps_per_rank"] == "36,36"
    assert tags["num_nodes"] == "2"
    digests = tags["param_digests"].split(",")
    assert len(digests) == 2 and digests[0] == digests[1]


def test_fsdp_trains_the_same_gpt_as_ddp_holding_half_the_parameters(
    tiny_run, tracking_uri, tmp_path
):
    """The shared text run again with scaling.strategy=fsdp: two workers on two nodes, each
    holding half the parameters, reach DDP's losses from the same start (tolerance 1e-3
    relative: the reductions differ, reduce-scatter vs all-reduce), and the logged model,
    gathered whole, scores text in a fresh process elsewhere."""
    fsdp = train(
        TEXT, tmp_path, *TEXT_SPEC, "scaling.strategy=fsdp", "tracking.experiment=test-gpt-fsdp",
        "tracking.system_metrics=false", "tracking.system_metrics_interval_s=0.5",
    )  # fmt: skip
    client = MlflowClient(tracking_uri)
    for key in ("train_loss", "val_loss"):
        ddp_curve, fsdp_curve = (
            [m.value for m in sorted(client.get_metric_history(r, key), key=lambda m: m.step)]
            for r in (tiny_run["run_id"], fsdp["run_id"])
        )
        assert len(fsdp_curve) == 3
        assert fsdp_curve == pytest.approx(ddp_curve, rel=1e-3), key
    ddp_tags = client.get_run(tiny_run["run_id"]).data.tags
    tags = client.get_run(fsdp["run_id"]).data.tags
    assert (tags["strategy"], tags["blocks"], tags["num_nodes"]) == ("fsdp", "Block", "2")
    # system_metrics: false leaves no system metrics (at an interval that would have sampled)
    assert not [k for k in client.get_run(fsdp["run_id"]).data.metrics if k.startswith("system/")]
    held, whole = int(tags["param_bytes_per_rank"]), int(ddp_tags["param_bytes_per_rank"])
    assert 0.5 <= held / whole < 0.51
    digests = tags["param_digests"].split(",")
    assert digests[0] == digests[1]  # the whole parameters, gathered on each rank
    scores = pyfunc_elsewhere(
        tracking_uri, fsdp["model_uri"], "pd.DataFrame({'text': ['def f(x): return x']})", tmp_path
    )
    assert 0 < scores["loss"][0] < np.log(256)


def test_generate_continues_the_prompt_from_mlflow(tiny_run, tracking_uri, capsys):
    rc, out, _ = cli_main(
        ["generate", tiny_run["run_id"], "--prompt", "def ", "--max-bytes", "40"], capsys
    )
    assert rc == 0
    assert out.startswith("def ") and len(out.encode()) > len("def ")
    rc2, again, _ = cli_main(
        ["generate", tiny_run["model_uri"], "--prompt", "def ", "--max-bytes", "40"], capsys
    )
    assert rc2 == 0 and again == out  # the same model by run id or URI, the same seed
    rc, _, err = cli_main(["generate", "0" * 32, "--prompt", "x"], capsys)
    assert rc == 2 and err.startswith("trainyard: error: cannot load") and err.count("\n") == 1


def test_generate_refuses_a_model_changed_after_trainyard_signed_it(
    tiny_run, tracking_uri, tmp_path, capsys
):
    """Someone with write access to the store points the tokenizer at code of theirs: the
    model is refused before anything in it is unpickled or imported."""
    import mlflow.artifacts

    from trainyard.cluster.signing import SIGNATURE_FILE

    copy = Path(mlflow.artifacts.download_artifacts(tiny_run["model_uri"], dst_path=str(tmp_path)))
    capsys.readouterr()  # (MLflow's download progress, not the command's)
    mlmodel = copy / "MLmodel"
    mlmodel.write_text(mlmodel.read_text().replace("tokenizer: bytes", "tokenizer: os:getcwd"))
    rc, _, err = cli_main(["generate", str(copy), "--prompt", "x"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "refused to load: files changed since it was signed: MLmodel" in err
    mlmodel.write_text(mlmodel.read_text().replace("tokenizer: os:getcwd", "tokenizer: bytes"))
    (copy / SIGNATURE_FILE).unlink()
    rc, _, err = cli_main(["generate", str(copy), "--prompt", "x"], capsys)
    assert rc == 2 and "it is not signed (trainyard did not log it)" in err
    rc, out, _ = cli_main(["generate", str(copy), "--prompt", "x", "--trust-model"], capsys)
    assert rc == 0 and out.startswith("x")


def test_predict_scores_text_files_as_the_model_predicts_their_bytes(
    tiny_run, tracking_uri, tmp_path, capsys
):
    """`trainyard predict` of a text model: per file, the mean next-byte loss over windows of
    the model's context, what the logged network's logits give for the same windows; a
    table's `text` column, as pandas reads it, scores the same through pyfunc.predict."""
    import mlflow
    import pandas as pd
    import torch

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = {"a.py": b"def f(x):\n    return x + 1\n" * 9, "b.txt": b"import json\n" * 3}
    for name, data in texts.items():
        (corpus / name).write_bytes(data)
    rc, _, err = cli_main(
        ["predict", tiny_run["model_uri"], str(corpus), "--out", str(tmp_path / "o")], capsys
    )
    assert rc == 0, err
    out = pd.read_parquet(tmp_path / "o")
    assert out["path"].tolist() == [str(corpus / n) for n in sorted(texts)]
    mlflow.set_tracking_uri(tracking_uri)
    net = mlflow.pyfunc.load_model(tiny_run["model_uri"]).unwrap_python_model().net
    for (_, data), row in zip(sorted(texts.items()), out.itertuples(), strict=True):
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
        nll = 0.0
        for start in range(0, len(ids) - 1, 64):  # the run's model.context
            window = ids[start : start + 65]
            with torch.no_grad():
                logits = net(torch.from_numpy(window[None, :-1])).double().numpy()[0]
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            nll -= logp[np.arange(len(window) - 1), window[1:]].sum()
        assert row.bytes == row.tokens == len(data)
        assert row.loss == pytest.approx(nll / (len(data) - 1), rel=1e-4)
        assert row.bits_per_byte == pytest.approx(nll / np.log(2) / len(data), rel=1e-4)
    # The same texts as a column of a table score the same; with --generate each row gets
    # what `trainyard generate` samples after it, whatever the batch.
    table = tmp_path / "texts.csv"
    pd.DataFrame({"id": [7, 8], "text": [t.decode() for _, t in sorted(texts.items())]}).to_csv(
        table, index=False
    )
    rc, _, err = cli_main(
        [
            "predict",
            tiny_run["model_uri"],
            str(table),
            "--keep",
            "id",
            "--out",
            str(tmp_path / "t"),
        ],
        capsys,
    )
    assert rc == 0, err
    scored = pd.read_parquet(tmp_path / "t")
    assert scored["id"].tolist() == [7, 8] and "path" not in scored
    np.testing.assert_allclose(scored["loss"], out["loss"], rtol=1e-6)
    read = f"pd.read_csv({str(table)!r})"
    scores = pyfunc_elsewhere(tracking_uri, tiny_run["model_uri"], read, tmp_path / "e")
    np.testing.assert_allclose(scores["loss"], scored["loss"], rtol=1e-6)
    np.testing.assert_allclose(scores["bits_per_byte"], scored["bits_per_byte"], rtol=1e-6)
    generate = ["--generate", "12", "--temperature", "0.5", "--seed", "3", "--batch-size", "1"]
    args = ["predict", tiny_run["model_uri"], str(table), "--out", str(tmp_path / "g"), *generate]
    rc, _, err = cli_main(args, capsys)
    assert rc == 0, err
    continued = pd.read_parquet(tmp_path / "g")["continuation"].tolist()
    for (_, data), text in zip(sorted(texts.items()), continued, strict=True):
        rc, sampled, _ = cli_main(
            ["generate", tiny_run["model_uri"], "--prompt", data.decode(), "--max-bytes", "12"]
            + ["--temperature", "0.5", "--seed", "3"],
            capsys,
        )
        assert sampled == data.decode() + text + "\n" and len(text.encode()) <= 12
    rc, _, err = cli_main(
        [
            "predict",
            tiny_run["model_uri"],
            str(corpus / "a.py"),
            "--out",
            str(tmp_path / "x"),
            "--keep",
            "id",
        ],
        capsys,
    )
    assert rc == 2 and err.strip().endswith("is files, not a table; there are no columns to keep")


def test_gpt2_small_config_runs_its_path_shrunk_to_cpu(ray_cluster, tracking_uri, tmp_path):
    """The GPU config as written, with the model, budget and device shrunk for this machine:
    tokens_per_step and micro_batch_size give 2 accumulation steps per worker."""
    summary = train(
        ROOT / "configs" / "stdlib-gpt2-small.yaml",
        tmp_path,
        f"data.path={SMALL_CORPUS}",
        "data.validation_windows=16",
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=32",
        "model.context=32",
        "train.tokens_per_step=512",
        "train.micro_batch_size=4",
        "train.epochs=1",
        "train.steps_per_epoch=3",
        "train.compile=false",
        "amp.mode=auto",
        "scaling.use_gpu=false",
        "scaling.num_workers=2",
        "tracking.log_model=false",
        "tracking.experiment=test-gpt2-small",
    )
    params = MlflowClient(tracking_uri).get_run(summary["run_id"]).data.params
    assert (params["plan.global_batch"], params["plan.accum_steps"]) == ("16", "2")
    # Validation in the training micro-batch: at GPT-2's vocabulary and context, windows of
    # 256 would need tens of GB for the logits alone.
    assert params["plan.eval_batch_size"] == "4"
    assert params["model.size"] == "gpt2-small" and params["train.compile"] == "False"
