"""Trained runs that several test files read, each trained once per session (a run costs ~20 s
of Ray Train start-up on this 2-core machine, whatever it then checks).

- `digits_straight`: 4 epochs of configs/digits.yaml, started while another job holds two of
  the cluster's three CPUs. test_never_hang checks that it said it waits and then trained;
  test_fault_tolerance resumes, interrupts and refuses against it (waiting changes nothing the
  run computes, so every run that fails and resumes must end bit for bit where it ended).
- `text_run`: the tiny GPT config, shrunk, three epochs that end in the middle of a pass, its
  model logged. test_text_e2e reads its curves, samples and scores from its model;
  test_fault_tolerance interrupts the same spec in epoch 2 and must end where it ended.
"""

from __future__ import annotations

import contextlib
import io
import json
import sysconfig
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DIGITS = str(ROOT / "configs" / "digits.yaml")
TEXT = str(ROOT / "configs" / "stdlib-gpt-tiny.yaml")

FAULTS = "test-faults"
"""The experiment of the failure tests' runs, the digits reference among them."""
FAST = ("train.log_every_steps=1000", "tracking.log_model=false")

# ~130 KB of real code from this Python's standard library: json, email's header modules, ...
SMALL_CORPUS = f"{sysconfig.get_paths()['stdlib']}/[jc]*/*.py"
TEXT_SPEC = (
    f"data.path={SMALL_CORPUS}",
    "data.validation_windows=64",
    "model.context=64",
    "train.epochs=3",
    "train.steps_per_epoch=12",  # a pass is longer: epochs end in the middle of one
    "train.batch_size=16",
    "scaling.placement_strategy=SPREAD",
    # Streamed from the object store in windows of ~one block, not held: the interrupted run
    # resumes in the middle of a streamed pass.
    "data.in_memory_max_mb=0",
    "data.shuffle_window_mb=0.05",
    # A user's optimizer and schedule (after a warm-up: SequentialLR), checkpointed and resumed.
    "train.optimizer=torch.optim:RAdam",
    "train.optimizer_args={betas: [0.9, 0.95]}",
    "train.schedule=torch.optim.lr_scheduler:CosineAnnealingLR",
    "train.warmup_fraction=0.1",
)
"""What the text run computes (test_fault_tolerance's interrupted run takes the same)."""


def run_args(out: Path, name: str, config: str, *overrides: str) -> list[str]:
    """`trainyard train CONFIG` arguments: checkpoints under `out`/results, the summary in
    `out`/NAME.json, the MLflow run named NAME."""
    sets = (f"scaling.storage_path={out / 'results'}", f"tracking.run_name={name}", *overrides)
    return [
        config,
        "--summary",
        str(out / f"{name}.json"),
        *[a for s in sets for a in ("--set", s)],
    ]


class _Watched(io.StringIO):
    """Standard output kept (and passed on), with an event set once `text` is written."""

    def __init__(self, text: str, passed_to):
        super().__init__()
        self.text, self.passed_to = text, passed_to
        self.seen, self.done = threading.Event(), threading.Event()

    def write(self, s: str) -> int:
        self.passed_to.write(s)
        n = super().write(s)
        if self.text in s:
            self.seen.set()
        return n


@pytest.fixture(scope="session")
def digits_straight(ray_cluster, tracking_uri, tmp_path_factory) -> dict:
    """The run `straight`: {"out": its directory, "summary": its --summary, "stdout": what it
    printed}. Another job's placement group holds two CPUs until the run has said that its
    workers wait for them and its own placement group is pending behind it."""
    import sys

    from conftest import train_command
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.state import list_placement_groups

    out = tmp_path_factory.mktemp("straight")
    busy = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    busy.wait(30)
    stdout = _Watched("waiting up to", sys.stdout)

    def release() -> None:  # once the run's own placement group waits behind this one
        stdout.seen.wait(120)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not stdout.done.is_set():
            groups = list_placement_groups(filters=[("state", "=", "PENDING")], timeout=10)
            if any(g.placement_group_id != busy.id.hex() for g in groups):
                break
            time.sleep(0.5)
        remove_placement_group(busy)

    releasing = threading.Thread(target=release)
    releasing.start()
    args = run_args(
        out, "straight", DIGITS, "train.epochs=4", f"tracking.experiment={FAULTS}",
        "scaling.placement_strategy=SPREAD", *FAST,
    )  # fmt: skip
    try:
        with contextlib.redirect_stdout(stdout):
            rc = train_command(args)
    finally:
        stdout.seen.set()
        stdout.done.set()
        releasing.join()
    assert rc == 0, stdout.getvalue()[-3000:]
    summary = json.loads((out / "straight.json").read_text())
    return {"out": out, "summary": summary, "stdout": stdout.getvalue()}


@pytest.fixture(scope="session")
def text_run(ray_cluster, tracking_uri, tmp_path_factory) -> dict:
    """The run `text-straight` in experiment test-gpt-tiny, its model logged: its --summary."""
    from conftest import train_command

    out = tmp_path_factory.mktemp("gpt-tiny")
    args = run_args(
        out, "text-straight", TEXT, *TEXT_SPEC, "train.log_every_steps=6",
        "tracking.experiment=test-gpt-tiny",
    )  # fmt: skip
    assert train_command(args) == 0
    return json.loads((out / "text-straight.json").read_text())
