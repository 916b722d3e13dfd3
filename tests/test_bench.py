"""`trainyard bench all --quick` on the local 3-node cluster: every suite produces its
contenders, consistent ratios, the JSON, Markdown and PNG files and one MLflow run. Structure
and sanity only: speed is what the benchmark reports, never what a test asserts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from trainyard.pipelines.bench import SUITES
from trainyard.pipelines.driver.startup import PHASES

PREDICT = ("batch inference", "steady state per actor")
EXPECTED = {
    "preprocess": {"gil-holding", "gil-releasing"},
    "ingest": {"feeding batches", "training step time", "data-wait share of step time"},
    "images": {"decode + augment into batches", "data-wait share of a ResNet's step"},
    "predict": {f"{kind}: {what}" for kind in ("images", "tabular") for what in PREDICT},
    "trainer": {"steady-state step time", "launch to first step"},
    "sharding": {
        "bytes held per worker, 2 workers",
        "peak memory per worker, 2 workers",
        "step time, 2 workers",
    },
    "amp": None,  # one case per model, named after the device
    "tracking": {"step time", "share of step time in MLflow calls"},
    "overhead": {"command to first step", "per-epoch time", "command to done"}
    | {f"trainyard: to {end}" for end in PHASES.values()},
    "scale": {
        f"{what} at 20,000 rows"
        for what in (
            "command to done",
            "command to data ready",
            "training rows/s",
            "peak memory of the process tree",
            "held-out accuracy",
        )
    },
}


@pytest.fixture(scope="module")
def quick_bench(ray_cluster, tracking_uri, tmp_path_factory):
    """The command as a user runs it, in its own process on the session's cluster (it starts
    and stops its own pools, torchrun process trees and Ray Train runs); the suite runs it
    last (conftest), after everything that shares the cluster."""
    out = tmp_path_factory.mktemp("bench")
    env = os.environ | {"RAY_ADDRESS": ray_cluster.address, "MLFLOW_TRACKING_URI": tracking_uri}
    proc = subprocess.run(
        [sys.executable, "-m", "trainyard.pipelines", "bench", "all", "--quick", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-10000:]
    assert "trainer / steady-state step time" in proc.stdout
    return out


def test_all_suites_write_json_markdown_and_chart(quick_bench):
    for name in ("results.json", "results.md", "results.png", "scale.png"):
        assert (quick_bench / name).stat().st_size > 0
    result = json.loads((quick_bench / "results.json").read_text())
    assert result["quick"] is True
    assert {"cpu", "cores", "gpu", "torch", "ray", "mlflow"} <= set(result["machine"])
    suites = {}
    for case in result["cases"]:
        suites.setdefault(case["suite"], set()).add(case["case"])
    assert set(suites) == set(SUITES)
    for suite, cases in EXPECTED.items():
        if cases is not None:
            assert suites[suite] == cases
    assert len(suites["amp"]) == 2
    markdown = (quick_bench / "results.md").read_text()
    assert all(f"## {c['suite']}: {c['case']}" in markdown for c in result["cases"])


def test_every_contender_is_measured_and_ratios_match_the_timings(quick_bench):
    result = json.loads((quick_bench / "results.json").read_text())
    contenders = {(c["suite"], c["case"]): c["contenders"] for c in result["cases"]}
    preprocess = contenders[("preprocess", "gil-holding")]
    assert {"serial", "Ray Data map_batches (tasks)", "Ray Data map_batches (actors)"} <= set(
        preprocess
    )
    assert any(k.startswith("ThreadPoolExecutor") for k in preprocess)
    assert any(k.startswith("ProcessPoolExecutor") for k in preprocess)
    assert any(k.startswith("torch.multiprocessing") for k in preprocess)
    feeding = contenders[("ingest", "feeding batches")]
    assert "Ray Data iter_torch_batches" in feeding and "DataLoader(num_workers=0)" in feeding
    images = contenders[("images", "decode + augment into batches")]
    assert {
        "DataLoader(num_workers=0)",
        "Ray Data: read, decode, augment",
        "Ray Data: decoded once, augment (trainyard)",
    } <= set(images)
    for kind in ("images", "tabular"):
        predict = set(contenders[("predict", f"{kind}: batch inference")])
        assert {"pyfunc.predict, one process", "trainyard predict (Ray Data actors)"} < predict
        assert any(k.startswith("ThreadPoolExecutor(") for k in predict)
        steady = contenders[("predict", f"{kind}: steady state per actor")]
        assert len(steady) == 3 and all(c["median"] > 0 for c in steady.values())
    assert set(contenders[("trainer", "steady-state step time")]) == {
        "torchrun",
        "Ray Train TorchTrainer",
    }
    # FSDP holds half of what DDP holds on each of 2 workers (shards padded: a little more).
    held = contenders[("sharding", "bytes held per worker, 2 workers")]
    assert held["fsdp"]["ratio"] == pytest.approx(0.5, abs=0.01)
    assert set(contenders[("overhead", "command to done")]) == {
        "plain torchrun script",
        "trainyard, running cluster",  # (--quick leaves out the cold start: a whole new Ray)
    }
    # The run's start-up phases, as its tags record them, end in order, within its whole time.
    ends = [contenders[("overhead", f"trainyard: to {end}")] for end in PHASES.values()]
    ends = [c["trainyard, running cluster"]["median"] for c in ends]
    assert ends == sorted(ends), ends
    done = contenders[("overhead", "command to done")]["trainyard, running cluster"]["median"]
    assert ends[-1] <= done
    for case in result["cases"]:
        ref = case["contenders"][case["reference"]]["median"]
        for name, c in case["contenders"].items():
            assert len(c["values"]) == 1, (case["case"], name)  # --quick: one round
            assert c["min"] <= c["median"] <= c["max"]
            if case["unit"] != "%":
                assert c["min"] > 0 and math.isfinite(c["max"]), (case["case"], name)
            if ref:
                assert c["ratio"] == pytest.approx(c["median"] / ref)


def test_one_mlflow_run_holds_the_results(quick_bench, tracking_uri):
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("trainyard-bench")
    runs = client.search_runs([exp.experiment_id])  # the tracking probe run is deleted
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "results.json",
        "results.md",
        "results.png",
        "scale.png",  # (a suite's own figure)
    }
    assert run.data.params["quick"] == "True"
    assert "trainer.steady-state_step_time.torchrun.ratio" in run.data.metrics
