"""A tracking server that goes away in the middle of a run on the local cluster: a real `mlflow
server` (SQLite store, proxied artifacts) is killed while `trainyard train` runs as a user runs
it (a process of its own, on 2 workers). Killed for 120 s and started again on the same store,
the run trains on through it and finishes; killed for good, the run ends with exit code 3 and
keeps what MLflow missed beside its checkpoint, and `--resume` sends it once the server is
back. Either way: one run, FINISHED, every epoch's metrics once, the model loadable, and one
outage said in two console lines, not a line per retry."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import pyfunc_elsewhere
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_digits

from trainyard.cluster.local import free_port
from trainyard.cluster.mlflow_server import server_command, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
OUTAGE_S = 120
EXPERIMENT = "test-tracking-outage"


class Server:
    """`mlflow server` on loopback over one store, stopped and started again at will."""

    def __init__(self, store: Path):
        store.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        artifacts = store / "artifacts"
        db = f"sqlite:///{store / 'mlflow.db'}"
        self.command = server_command("127.0.0.1", self.port, db, str(artifacts))
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_healthy(self.url, timeout_s=120)

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)  # (the server and its workers)
            self.process.wait()
            self.process = None


class Command:
    """`trainyard train ARGS` in a process of its own, its console read line by line."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.lines: list[tuple[float, str]] = []
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "trainyard"), "train", *args],
            cwd=ROOT,
            env=os.environ | env | {"PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def wait_for(self, pattern: str, after: float = 0.0, timeout: float = 240) -> float:
        """When a line matching `pattern` came after time `after`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                if at >= after and re.search(pattern, line):
                    return at
            assert self.process.poll() is None or self.reader.is_alive(), self.text()
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r} in {timeout:g} s:\n{self.text()}")

    def finish(self, timeout: float) -> int:
        rc = self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return rc

    def text(self, since: float = 0.0, until: float = float("inf")) -> str:
        return "\n".join(line for at, line in self.lines if since <= at < until)


def epochs_logged(text: str) -> dict[int, float]:
    """The epochs whose progress line is in `text`, with their seconds."""
    return {
        int(m[1]): float(m[2]) for m in re.finditer(r"epoch (\d+)/\d+ .*\((\d+\.\d+) s, ", text)
    }


def train_args(tmp_path: Path, name: str, epochs: int, *overrides: str) -> list[str]:
    sets = [
        f"train.epochs={epochs}",
        f"tracking.run_name={name}",
        f"tracking.experiment={EXPERIMENT}",
        f"scaling.storage_path={tmp_path / 'results'}",
        "scaling.num_workers=2",
        "model.hidden=[1024, 1024]",  # (epochs of ~1.5 s here)
        "train.batch_size=16",
        "train.log_every_steps=1000",
        *overrides,
    ]
    return [str(ROOT / "configs" / "digits.yaml"), *[a for s in sets for a in ("--set", s)]]


def outage_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "MLflow server" in line]


def assert_whole(server: Server, name: str, epochs: int, tmp_path: Path) -> None:
    """The run `name` is one MLflow run, FINISHED, with every epoch's metrics once and the
    last epoch's tags, and its model predicts the digits in a fresh process."""
    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (run,) = client.search_runs([experiment], f"tags.`ray.train.run_name` = '{name}'")
    run_id = run.info.run_id
    assert run.info.status == "FINISHED", run.data.tags.get("error")
    for key in ("train_loss", "val_accuracy", "epoch_seconds"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(1, epochs + 1)), (key, steps)
    assert run.data.tags["param_digests"]  # (the last epoch's)
    rows = "__import__('sklearn.datasets').datasets.load_digits(as_frame=True).data[:100]"
    logits = pyfunc_elsewhere(server.url, f"runs:/{run_id}/model", rows, tmp_path / f"use-{name}")
    labels = load_digits().target[:100]
    assert (np.asarray(logits).argmax(1) == labels).mean() > 0.9


def capture(out: dict, call, *args) -> None:
    """`call(*args)` in a thread: its value or its error into `out`."""
    try:
        out["value"] = call(*args)
    except BaseException as e:
        out["error"] = e


def gone_for_good(ray_cluster, tmp_path: Path) -> str:
    """A run of 12 epochs whose server is killed after epoch 2 and is not back within
    tracking.end_wait_s (10 s here): training goes on to the end; exit code 3, what MLflow
    missed written beside the newest checkpoint; once the server is back, `--resume` trains
    nothing, sends it and ends the run. What it measured."""
    server = Server(tmp_path / "gone")
    name, epochs = "gone", 12
    args = train_args(tmp_path, name, epochs, "tracking.end_wait_s=10")
    env = {"RAY_ADDRESS": ray_cluster.address, "MLFLOW_TRACKING_URI": server.url}
    server.start()
    command = None
    try:
        command = Command(args, env)
        command.wait_for(rf"epoch 2/{epochs} ")
        server.stop()
        assert command.finish(timeout=300) == 3, command.text()[-4000:]
        ended = time.time()
    finally:
        server.stop()
        if command is not None and command.process.poll() is None:
            command.process.kill()
    text = command.text()
    assert max(epochs_logged(text)) == epochs, text[-3000:]  # trained to the end
    last_epoch = command.wait_for(rf"epoch {epochs}/{epochs} ")
    said = outage_lines(text)
    assert len(said) == 2, said  # the workers' line, then the end's; no line per retry
    assert "does not answer" in said[0] and "training goes on" in said[0], said
    assert "did not answer within tracking.end_wait_s (10 s)" in said[1], said
    assert f"--resume {name}" in said[1] and "Retrying" not in text
    waited = re.search(r"(\d+) record\(s\) of the workers wait in (\S+)", text)
    assert waited and int(waited[1]) > 0, text[-3000:]
    kept = json.loads(Path(waited[2]).read_text())
    assert len(kept) == int(waited[1])
    steps = sorted(args[1] for n, args in kept if n == "_log_metrics")
    assert steps[-1] == epochs and steps[0] <= 3, steps  # (from the first epoch it missed)

    server.start()  # back: --resume sends it, logs the model, ends the run
    try:
        began = time.time()
        resumed = Command([*args, "--resume", name], env)
        assert resumed.finish(timeout=300) == 0, resumed.text()[-4000:]
        took = time.time() - began
        assert f"{name} is trained" in resumed.text() and "ending it" in resumed.text()
        assert "epoch 1/" not in resumed.text()  # (nothing trained again)
        assert_whole(server, name, epochs, tmp_path)
    finally:
        server.stop()
    return (
        f"server gone for good: the command ended {ended - last_epoch:.0f} s after the last "
        f"epoch, {len(kept)} records kept; --resume ended the run in {took:.0f} s"
    )


@pytest.mark.timeout(600)
def test_tracking_servers_away_120_s_or_gone_for_good_hold_no_training_and_lose_nothing(
    ray_cluster, tmp_path
):
    """A run of 40 epochs whose server is killed after epoch 2 and started again on the same
    store 120 s later: the run trains on (its epochs end inside the outage on this machine),
    its end waits for the server (tracking.end_wait_s), then it finishes, exit code 0. What
    was logged meanwhile is stored once the server is back (by the workers, had they still
    trained, else by the driver's end); the console says it in two lines, not one a retry.
    The run of `gone_for_good` (a server of its own) starts as the outage does, and its workers
    take the place of this run's once they are done: both wait through one outage."""
    server = Server(tmp_path / "away")
    name, epochs = "away", 40
    env = {"RAY_ADDRESS": ray_cluster.address, "MLFLOW_TRACKING_URI": server.url}
    server.start()
    command = None
    try:
        command = Command(train_args(tmp_path, name, epochs), env)
        command.wait_for(rf"epoch 2/{epochs} ")
        server.stop()
        gone = time.time()
        other: dict = {}
        thread = threading.Thread(
            target=capture, args=(other, gone_for_good, ray_cluster, tmp_path)
        )
        thread.start()
        time.sleep(max(0.0, gone + OUTAGE_S - time.time()))
        server.start()
        back = time.time()
        assert command.finish(timeout=400) == 0, command.text()[-4000:]
        assert_whole(server, name, epochs, tmp_path)
        thread.join(timeout=400)
        if "error" in other:
            raise other["error"]
    finally:
        server.stop()
        if command is not None and command.process.poll() is None:
            command.process.kill()
    text = command.text()
    during = epochs_logged(command.text(gone, back))
    before = epochs_logged(command.text(until=gone))
    said = outage_lines(text)
    print(
        f"tracking server away {back - gone:.0f} s: {len(during)} epochs trained meanwhile "
        f"(mean {sum(during.values()) / len(during):.2f} s each; before it "
        f"{sum(before.values()) / len(before):.2f} s); its lines: {said}; {other['value']}"
    )
    assert len(during) >= 10, text[-3000:]  # training did not stand still
    assert len(said) == 2, said  # one line as it went away, one as it was back
    assert "does not answer" in said[0] and "training goes on" in said[0], said
    assert "is back after" in said[1], said
    assert "Retrying" not in text
