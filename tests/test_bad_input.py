"""Each user mistake is one clear line and a non-zero exit, before any worker starts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import train_command as main
from mlflow.tracking import MlflowClient

from trainyard.pipelines.data.tabular.rows import read_raw
from trainyard.pipelines.data.tabular.spec import TabularDataSpec as DataSpec

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = "test-bad-input"


def spec_for(tmp_path: Path, data: str, **extra: str) -> Path:
    path = tmp_path / "spec.yaml"
    sections = "".join(f"{k}: {v}\n" for k, v in extra.items())
    path.write_text(f"data: {data}\ntracking: {{experiment: {EXPERIMENT}}}\n{sections}")
    return path


def csv(tmp_path: Path, text: str, name: str = "d.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def good_rows(n: int = 40) -> str:
    return "".join(f"{i},{i * 2},{i % 2}\n" for i in range(n))


def data_spec(path: Path, *extra: str) -> str:
    return "{" + ", ".join([f"path: {path}", *extra]) + "}"


def with_header(header: str, rows: str) -> str:
    return header + "\n" + rows


def parquet_with_nan(tmp_path: Path) -> Path:
    """A regression set as Parquet with one NaN cell (row 18), which nothing parses away."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    b = np.arange(40.0) * 2
    b[17] = np.nan  # a NaN value (pandas would store a null)
    table = pa.table({"a": np.arange(40.0), "b": b, "y": np.arange(40.0)})
    pq.write_table(table, tmp_path / "d.parquet")
    return tmp_path / "d.parquet"


CASES = {
    "missing path": (
        lambda t: "{path: /nonexistent/x.csv}",
        "data.path: no such file or directory: /nonexistent/x.csv",
    ),
    "missing label": (
        lambda t: data_spec(csv(t, with_header("a,b,target", good_rows())), "label: targt"),
        "data.label: column 'targt' is not in the data (did you mean 'target'?)",
    ),
    "missing feature": (
        lambda t: data_spec(
            csv(t, with_header("a,b,y", good_rows())), "label: y", "features: [a, c]"
        ),
        "data.features: column 'c' is not in the data",
    ),
    "blank category": (
        lambda t: data_spec(
            csv(
                t,
                with_header(
                    "a,color,y",
                    "".join(f"{i},{'' if i == 7 else 'red'},{i % 2}\n" for i in range(40)),
                ),
            ),
            "label: y",
        ),
        "1 row(s): line 9 (color is empty). Fix them, or set data.on_bad_rows: skip (empty "
        "values: or data.missing: impute)",
    ),
    "categorical not a feature": (
        lambda t: data_spec(
            csv(t, with_header("a,b,y", good_rows())), "label: y", "categorical: [colour]"
        ),
        "data.categorical: column 'colour' is not in the data",
    ),
    "empty": (
        lambda t: data_spec(csv(t, with_header("a,b,y", "")), "label: y"),
        "hold no data rows",
    ),
    "one class": (
        lambda t: data_spec(
            csv(t, with_header("a,b,y", "".join(f"{i},{i},1\n" for i in range(40)))), "label: y"
        ),
        "data.label: 'y' has only one class (1)",
    ),
    "too few rows": (
        lambda t: data_spec(csv(t, with_header("a,b,y", good_rows(20))), "label: y"),
        "fewer than one optimizer step (32 rows each)",
    ),
    "bad rows": (
        lambda t: data_spec(
            csv(
                t, with_header("a,b,y", good_rows(10) + "1,2,3,4\n" + good_rows(10) + "5,oops,1\n")
            ),
            "label: y",
        ),
        "data: 2 CSV row(s) do not parse",
    ),
    "tiny class": (
        lambda t: data_spec(csv(t, with_header("a,b,y", good_rows(100) + "1,1,7\n")), "label: y"),
        "data.label: 1 class(es) of 'y' too small to appear in both splits (7: no validation row",
    ),
    "parquet NaN": (
        lambda t: data_spec(parquet_with_nan(t), "label: y", "task: regression"),
        "d.parquet: 1 row(s): row 18 (b is NaN)",
    ),
    "infinite value": (
        lambda t: data_spec(csv(t, with_header("a,b,y", good_rows(39) + "inf,1,0\n")), "label: y"),
        "1 row(s): line 41 (a='inf' is not finite)",
    ),
}


# A recipe the run cannot follow, on good data: (spec sections, the line).
RECIPE_CASES = {
    "optimizer not a class of one": (
        {"train": "{optimizer: 'torch.nn:Linear'}"},
        "train.optimizer: torch.nn:Linear is the class Linear, not a torch.optim.Optimizer",
    ),
    "optimizer argument": (
        {"train": "{optimizer: 'torch.optim:Adadelta', optimizer_args: {rhoo: 0.9}}"},
        "train.optimizer_args: torch.optim:Adadelta takes no argument 'rhoo'; it takes: ",
    ),
    "scheduler not a class of one": (
        {"train": "{schedule: 'torch.optim:SGD'}"},
        "train.schedule: torch.optim:SGD is the class SGD, not a torch LR scheduler class",
    ),
    "scheduler argument missing": (
        {"train": "{schedule: 'torch.optim.lr_scheduler:StepLR'}"},
        "missing 1 required positional argument: 'step_size'",
    ),
    "unknown metric": (
        {"train": "{metrics: [accuracy, f2]}"},
        "train.metrics: expected accuracy, f1, precision, recall, auroc, rmse, mae, mse, r2, "
        "top<k> or module:attr of a torchmetrics Metric, got 'f2'",
    ),
    "metric of another task": (
        {"train": "{metrics: [rmse]}"},
        "train.metrics: rmse is a regression metric; this run is classification",
    ),
    "monitor never logged": (
        {"train": "{monitor: val_f1}"},
        "train.monitor: this run never logs 'val_f1'; it logs train_loss, val_loss, "
        "val_accuracy (add the metric to train.metrics)",
    ),
    "own loss, no targets keyword": (
        {"train": "{loss: model}"},
        "train.loss: model needs the targets passed to the model, but MLP.forward takes no "
        "argument 'targets'",
    ),
    "own loss, none returned": (
        {"model": "{name: 'noloss:Net'}", "train": "{loss: model}"},
        "model: noloss:Net and its own loss fail on two training rows (x (2, 2) float32, y (2,) "
        "int64): TypeError: the model, given its targets, returned Tensor and no loss",
    ),
}


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_a_recipe_the_run_cannot_follow_is_one_line_before_training(
    case, ray_cluster, tracking_uri, tmp_path, capsys, monkeypatch
):
    sections, message = RECIPE_CASES[case]
    monkeypatch.chdir(tmp_path)  # (the project directory: noloss.py)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "noloss.py").write_text(
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, in_features, num_classes):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(in_features, num_classes)\n"
        "    def forward(self, x, targets=None):\n"
        "        return self.fc(x)\n"
    )
    data = data_spec(csv(tmp_path, with_header("a,b,y", good_rows(200))), "label: y")
    rc = main([str(spec_for(tmp_path, data, **sections))])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    ours = [line for line in err.splitlines() if not RAY_WORKER_LINE.match(line)]
    assert len(ours) == 1 and ours[0].startswith("trainyard: error:"), err


# Ray forwards its worker processes' output to the driver, each line prefixed "(task pid=N)",
# "(ReadCSV->SplitBlocks(6) pid=N)", "(raylet)", ...; under load that includes Ray's own noise
# (abseil "RAW: Lock blocking" warnings, a worker's abort trace at shutdown). Not ours.
RAY_WORKER_LINE = re.compile(
    r"^(\x1b\[\d+m)?\((raylet|[^()\s]*(\([^()]*\))?[^()\s]* pid=\d+(, ip=[\d.]+)?)\)"
)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_is_one_line_before_training(case, ray_cluster, tracking_uri, tmp_path, capsys):
    make_data, message = CASES[case]
    rc = main([str(spec_for(tmp_path, make_data(tmp_path)))])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    ours = [line for line in err.splitlines() if not RAY_WORKER_LINE.match(line)]
    assert len(ours) == 1 and ours[0].startswith("trainyard: error:"), err
    experiment = MlflowClient(tracking_uri).get_experiment_by_name(EXPERIMENT)
    assert experiment is None or not MlflowClient(tracking_uri).search_runs(
        [experiment.experiment_id]
    )


def test_bad_rows_name_their_lines(ray_cluster, tmp_path, capsys):
    path = csv(tmp_path, "a,b,y\n" + good_rows(10) + "1,2,3,4\n" + good_rows(10) + "5,oops,1\n")
    assert main([str(spec_for(tmp_path, f"{{path: {path}, label: y}}"))]) == 2
    err = capsys.readouterr().err
    assert "2 row(s): line 12 (4 fields instead of 3), line 23 (b='oops' is not a number)" in err
    assert "data.on_bad_rows: skip" in err


def test_skipped_bad_rows_leave_the_good_ones(ray_cluster, tmp_path):
    path = csv(
        tmp_path, "a,b,y\n" + good_rows(10) + "1,2,3,4\n" + good_rows(10) + "5,oops,1\n" + "6,,0\n"
    )
    ds, features, _ = read_raw(DataSpec(path=str(path), label="y", on_bad_rows="skip"), 1.0)
    rows = ds.to_pandas()
    assert features == ["a", "b"] and len(rows) == 20
    assert rows.a.dtype.kind == "f" and rows.b.dtype.kind == "f"


def test_skipped_parquet_rows_leave_the_good_ones(ray_cluster, tmp_path):
    path = parquet_with_nan(tmp_path)
    spec = DataSpec(path=str(path), label="y", task="regression", on_bad_rows="skip")
    ds, _, _ = read_raw(spec, 1.0)
    rows = ds.to_pandas()
    assert len(rows) == 39 and 34.0 not in rows.b.tolist()


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "trainyard.pipelines.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_spec_error_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {path: builtin:digits}\ntrain: {epochs: 3, bacth_size: 8}\n")
    proc = run_cli(str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "trainyard: error: unknown key train.bacth_size (did you mean train.batch_size?); "
        "valid keys: epochs, batch_size, tokens_per_step, micro_batch_size, lr, weight_decay, "
        "optimizer, optimizer_args, momentum, schedule, schedule_args, schedule_interval, "
        "min_lr_fraction, warmup_fraction, grad_accum_steps, eval_batch_size, steps_per_epoch, "
        "compile, grad_clip, label_smoothing, loss, metrics, monitor, monitor_mode, patience, "
        "min_delta, seed, checkpoint_every, keep_checkpoints, log_every_steps, "
        "max_nonfinite_steps, stall_timeout_s"
    )
    assert "Traceback" not in proc.stdout + proc.stderr


def test_dry_run_prints_spec_and_plan_without_training(tmp_path):
    proc = run_cli("configs/digits.yaml", "--dry-run", "--set", "train.epochs=7")
    assert proc.returncode == 0, proc.stderr
    assert "epochs: 7" in proc.stdout
    assert "# resource plan" in proc.stdout and "Ray Data:" in proc.stdout
    assert "MLflow run" not in proc.stdout


def test_parquet_directory_and_glob_are_read(ray_cluster, tmp_path):
    import pandas as pd

    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(3):
        part = pd.DataFrame(
            {"f1": [float(i)] * 5, "f2": [1.0] * 5, "target": ["a", "b"] * 2 + ["a"]}
        )
        part.to_parquet(folder / f"part-{i}.parquet")
    for path in (folder, folder / "part-*.parquet"):
        ds, features, _ = read_raw(DataSpec(path=str(path), label="target"), 1.0)
        assert features == ["f1", "f2"] and ds.count() == 15
    ds, _, _ = read_raw(DataSpec(path=str(folder / "part-[01].parquet"), label="target"), 1.0)
    assert ds.count() == 10


def test_quoted_fields_with_line_breaks_and_commas_are_one_value_everywhere(ray_cluster, tmp_path):
    """One table reader (data.tables) for the schema check, the bad-row scan, training's
    read and prediction's: a quoted note holding commas and line breaks is
    one value of one row in each. The file is larger than Arrow's 1 MB parse blocks, so that a
    block boundary falls inside a quoted value (which a small file never shows)."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    from trainyard.pipelines.config.spec import load_spec
    from trainyard.pipelines.data.tabular import pipeline as tabular
    from trainyard.pipelines.driver.session import init_ray
    from trainyard.pipelines.jobs.pool import read_table_file

    notes = ['"plain"', '"two, parts"', '"a line\nand another, too"', '"x\n\ny"']
    n = 120_000  # (2.6 MB)
    path = csv(tmp_path, "a,note,y\n" + "".join(f"{i},{notes[i % 4]},{i % 2}\n" for i in range(n)))
    init_ray()
    spec = load_spec(spec_for(tmp_path, data_spec(path, "label: y")), [])
    data = tabular.prepare(spec, task_cpus=0.5, num_workers=2, rows_per_step=32)
    assert data.num_train + data.num_validation == n  # no row cut by its line breaks
    assert data.params["features.categories"] == "note=4"
    table = read_table_file({"path": pa.array([str(path)])}, pafs.LocalFileSystem(), "csv")
    assert table.num_rows == n and table["note"][2].as_py() == "a line\nand another, too"
