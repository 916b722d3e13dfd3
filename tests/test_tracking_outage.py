"""A tracking server that goes away in the middle of a run on the local cluster: a real `mlflow
server` (SQLite store, proxied artifacts) is killed for 120 s while `trainyard train` runs as a
user runs it (a process of its own), started again on the same store, then killed for good
before the run ends. Training goes on through both; the run ends with exit code 3 and keeps
what MLflow missed beside its checkpoint; `--resume` sends it once the server is back. In the
end: one run, FINISHED, every epoch's metrics once, the model loadable, and two console lines
for the outage that ended, not a line per retry."""

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
from trainyard.pipelines.training.checkpoint import PENDING_FILE

ROOT = Path(__file__).resolve().parent.parent
OUTAGE_S = 120
EPOCHS = 125  # (epochs of ~1.4 s here: training outlasts the outage and what follows it)
NAME = "outage"
EXPERIMENT = "test-tracking-outage"


class Server:
    """`mlflow server` on loopback over one store, stopped and started again at will."""

    def __init__(self, store: Path):
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
        int(m[1]): float(m[2])
        for m in re.finditer(rf"epoch (\d+)/{EPOCHS} .*\((\d+\.\d+) s, ", text)
    }


@pytest.mark.timeout(720)
def test_a_tracking_server_away_120_s_then_gone_holds_no_training_and_loses_nothing(
    ray_cluster, tmp_path
):
    server = Server(tmp_path)
    sets = [
        f"train.epochs={EPOCHS}",
        f"tracking.run_name={NAME}",
        f"tracking.experiment={EXPERIMENT}",
        f"scaling.storage_path={tmp_path / 'results'}",
        "scaling.num_workers=2",
        "model.hidden=[1024, 1024]",
        "train.batch_size=16",
        "train.log_every_steps=1000",
        "tracking.end_wait_s=10",
    ]
    args = [str(ROOT / "configs" / "digits.yaml"), *[a for s in sets for a in ("--set", s)]]
    env = {"RAY_ADDRESS": ray_cluster.address, "MLFLOW_TRACKING_URI": server.url}
    server.start()
    command = None
    try:
        command = Command(args, env)
        # 1. Away for 120 s from the end of epoch 2, then back on the same store.
        command.wait_for(rf"epoch 2/{EPOCHS} ")
        server.stop()
        gone = time.time()
        time.sleep(OUTAGE_S)
        server.start()
        back = time.time()
        said_back = command.wait_for("MLflow server is back", after=back, timeout=60)
        command.wait_for(rf"epoch \d+/{EPOCHS} ", after=said_back)
        # 2. Away for good before the run ends: it ends within tracking.end_wait_s (10 s) of
        # the workers' end, exit code 3, what MLflow missed kept beside the checkpoint.
        server.stop()
        gone_again = time.time()
        assert command.finish(timeout=300) == 3, command.text()[-4000:]
        ended = time.time()
    finally:
        server.stop()
        if command is not None and command.process.poll() is None:
            command.process.kill()
    text = command.text()
    during = epochs_logged(command.text(gone, back))
    before = epochs_logged(command.text(until=gone))
    outage = [line for line in command.text(gone, gone_again).splitlines() if "MLflow" in line]
    last_epoch = command.wait_for(rf"epoch {EPOCHS}/{EPOCHS} ")
    print(
        f"tracking server away {back - gone:.0f} s: {len(during)} epochs trained meanwhile "
        f"(mean {sum(during.values()) / len(during):.2f} s each; before it "
        f"{sum(before.values()) / len(before):.2f} s); its lines: {outage}; gone for good "
        f"{last_epoch - gone_again:.0f} s before the last epoch, the command ended "
        f"{ended - last_epoch:.0f} s after it"
    )
    assert len(during) >= 10, text  # training did not stand still
    assert len(outage) == 2, outage  # one line when it went away, one when it was back
    assert "does not answer" in outage[0] and "training goes on" in outage[0], outage
    assert "is back after" in outage[1], outage
    assert max(epochs_logged(text)) == EPOCHS  # trained to the end, the server away
    assert "did not answer within tracking.end_wait_s (10 s)" in text, text[-3000:]
    assert f"--resume {NAME}" in text
    assert ended - gone_again < 200
    kept = sorted((tmp_path / "results" / NAME).glob(f"checkpoint_*/{PENDING_FILE}"))
    assert kept, "nothing kept beside the checkpoint"
    # What piled up in the first outage was stored soon after the server was back (in a few
    # requests, not one a record): the newest checkpoint keeps only epochs after it.
    steps = [args[1] for name, args in json.loads(kept[-1].read_text()) if name == "_log_metrics"]
    assert min(steps) > max(epochs_logged(command.text(until=said_back))), steps
    waited = re.search(r"(\d+) record\(s\) of the workers wait in", text)
    assert waited and int(waited[1]) > 0, text[-3000:]
    assert "Retrying" not in text  # (no line per retry)

    # 3. The server is back: --resume sends what was kept, logs the model, ends the run.
    server.start()
    try:
        began = time.time()
        resumed = Command([*args, "--resume", NAME], env)
        assert resumed.finish(timeout=300) == 0, resumed.text()[-4000:]
        print(f"--resume ended the run in {time.time() - began:.0f} s")
        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
        (run,) = client.search_runs([experiment])
        run_id = run.info.run_id
        assert run.info.status == "FINISHED", run.data.tags.get("error")
        for key in ("train_loss", "val_accuracy", "epoch_seconds"):
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            assert sorted(steps) == list(range(1, EPOCHS + 1)), (key, steps)
        assert run.data.tags["param_digests"]  # (the last epoch's, sent by --resume)
        assert "is trained" in resumed.text() and "ending it" in resumed.text()
        rows = "__import__('sklearn.datasets').datasets.load_digits(as_frame=True).data[:100]"
        logits = pyfunc_elsewhere(server.url, f"runs:/{run_id}/model", rows, tmp_path / "use")
        labels = load_digits().target[:100]
        assert (np.asarray(logits).argmax(1) == labels).mean() > 0.9
    finally:
        server.stop()
