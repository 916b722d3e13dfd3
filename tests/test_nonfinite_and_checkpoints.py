"""Numerics and checkpoints of the loop: fp16 overflow and NaN losses on a real two-rank gloo
group (DDP, two processes), and checkpoints that are refused when incomplete or corrupt."""

from __future__ import annotations

import pytest
import torch
from ranks import on_ranks
from torch import nn

from trainyard.cluster.errors import SpecError
from trainyard.pipelines.config.train import TrainSpec
from trainyard.pipelines.config.user import build_model
from trainyard.pipelines.training.checkpoint import (
    CheckpointError,
    TrainingState,
    load,
    save,
)
from trainyard.pipelines.training.loop import seed_epoch
from trainyard.pipelines.training.optim import make_scheduler
from trainyard.pipelines.training.step import param_digest, task_loss, train_epoch


def _batches(rank: int, n: int, poison: int | None) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(rank)
    out = []
    for i in range(n):
        x = torch.randn(16, 4, generator=g)
        if poison is not None and i < poison:
            x[0, 0] = float("nan")  # a NaN input row: this rank's loss is NaN
        out.append({"x": x, "y": (x[:, 0] > 0).long()})
    return out


def _worker(rank: int, results, case: str) -> None:
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = make_scheduler(optimizer, TrainSpec(warmup_fraction=0.0), 100)
    fp16 = case == "fp16 overflow"
    scaler = torch.amp.GradScaler("cpu", enabled=fp16)
    if fp16 and rank == 1:
        # An inf gradient on one rank only, on the first step: DDP's all-reduce spreads it.
        first = model.module[0].weight
        handle = first.register_hook(lambda g: torch.full_like(g, float("inf")))
    before = param_digest(model)
    stats = train_epoch(
        model,
        _batches(rank, 1, None) if fp16 else _batches(rank, 6, poison=4 if rank == 0 else None),
        optimizer,
        scheduler,
        scaler,
        loss_fn=task_loss("classification"),
        steps=1 if fp16 else 6,
        amp_dtype=torch.float16 if fp16 else None,
        max_nonfinite=3,
    )
    if fp16 and rank == 1:
        handle.remove()
    results[rank] = {
        "before": before,
        "after": param_digest(model),
        "skipped": stats.skipped,
        "stopped": stats.stopped,
        "steps": stats.steps,
        "lr_steps": scheduler.main.last_epoch,
        "loss": stats.loss,
    }


def _run(case: str) -> dict:
    return on_ranks(_worker, 2, case)


def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank():
    results = _run("fp16 overflow")
    for r in results.values():
        assert r["after"] == r["before"]  # parameters unchanged ...
        assert r["skipped"] == 1 and r["lr_steps"] == 0  # ... skipped once, no scheduler step
    assert results[0]["after"] == results[1]["after"]  # ... and equal on every rank


def test_nan_losses_on_one_rank_stop_every_rank_after_k_steps():
    results = _run("nan")
    for r in results.values():
        assert r["stopped"] and r["skipped"] == 3 and r["steps"] == 3
        assert r["before"] == r["after"]  # no poisoned update reached the parameters
        assert r["lr_steps"] == 0
    assert results[0]["after"] == results[1]["after"]


def test_checkpoints_are_refused_when_incomplete_or_corrupt(tmp_path):
    save(tmp_path, TrainingState(model={"w": torch.ones(3)}, epoch=2))
    assert load(tmp_path).epoch == 2
    state = tmp_path / "state.pt"
    state.write_bytes(state.read_bytes()[:-10])  # cut short, as by a crash mid-copy
    with pytest.raises(CheckpointError, match="corrupt"):
        load(tmp_path)
    (tmp_path / "state.sha256").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load(tmp_path)


def _write_as_is(directory, plain: dict) -> None:
    """A state file with a matching digest, whatever it holds."""
    import hashlib

    torch.save(plain, directory / "state.pt")
    digest = hashlib.sha256((directory / "state.pt").read_bytes()).hexdigest()
    (directory / "state.sha256").write_text(digest)


def test_checkpoints_name_their_format_and_older_ones_still_load(tmp_path):
    """A checkpoint says its format (5 for one taken inside an epoch, which earlier versions
    cannot resume; else 4, which they can); one written before it had a name (format 1: the same
    fields, no `format`, its optimizer state keyed by position) loads as it was; a newer
    format, or what is not a training state, is refused in one line."""
    save(tmp_path, TrainingState(model={"w": torch.ones(1)}, epoch=3, data_position=(2, 5)))
    assert torch.load(tmp_path / "state.pt", weights_only=True)["format"] == 4
    part = {"steps": 3, "loss_sum": 1.5, "samples": 6, "skipped": 0, "seconds": 1.0}
    save(tmp_path, TrainingState(model={}, epoch=3, in_epoch=part))  # (on a preemption notice)
    assert torch.load(tmp_path / "state.pt", weights_only=True)["format"] == 5
    assert load(tmp_path).in_epoch == part
    before = {"model": {"w": torch.ones(1)}, "optimizer": {"state": {}}, "scheduler": {}}
    before |= {"scaler": {}, "epoch": 4, "model_recipe": {"name": "mlp", "kwargs": {}}}
    before |= {"spec": {"train": {"epochs": 5}}, "schedule_steps": 50}
    before |= {"data_position": [3, 1], "elapsed": 12.5}  # the ten keys trainyard wrote
    _write_as_is(tmp_path, before)
    old = load(tmp_path)
    assert (old.epoch, old.data_position, old.schedule_steps, old.elapsed) == (4, (3, 1), 50, 12.5)
    assert load(tmp_path, optimizer=False).optimizer is None
    for plain, why in [
        ({**before, "format": 6}, "format 6, written by a newer trainyard"),
        ({"weights": {}, "epoch": 1}, "not a trainyard training state"),
    ]:
        _write_as_is(tmp_path, plain)
        with pytest.raises(CheckpointError, match=why) as error:
            load(tmp_path)
        assert "\n" not in str(error.value)


class Payload:
    """What an attacker who can write to checkpoint storage would put there."""

    def __reduce__(self):
        return (print, ("this ran as the checkpoint loaded",))


def test_checkpoints_hold_tensors_and_plain_values_and_nothing_else_loads(tmp_path, capsys):
    import hashlib

    state = TrainingState(model={"w": torch.ones(2)}, epoch=1, data_position=(1, 3))
    state.scheduler = {"lr_lambdas": [None], "base_lrs": [0.1]}
    save(tmp_path, state)
    digest = hashlib.sha256((tmp_path / "state.pt").read_bytes()).hexdigest()
    assert (tmp_path / "state.sha256").read_text().strip() == digest  # hashed as written
    assert load(tmp_path).data_position == (1, 3)
    # A checkpoint whose digest matches but whose pickle would run code is refused.
    torch.save({"model": {}, "epoch": 1, "extra": Payload()}, tmp_path / "state.pt")
    digest = hashlib.sha256((tmp_path / "state.pt").read_bytes()).hexdigest()
    (tmp_path / "state.sha256").write_text(digest)
    with pytest.raises(CheckpointError, match="more than tensors and plain values"):
        load(tmp_path)
    assert "this ran" not in capsys.readouterr().out
    # ... nor does a sharded one whose tensor index (DCP's pickled .metadata) would.
    import pickle

    from trainyard.pipelines.training.checkpoint import SHARDS_DIR, file_digest, save_shards

    net = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(net.parameters())
    groups, digests = save_shards(net, optimizer, tmp_path / SHARDS_DIR)
    state = TrainingState({}, epoch=1, optimizer={"param_groups": groups}, shards=digests)
    save(tmp_path, state)
    assert torch.equal(load(tmp_path).model["weight"], net.weight.detach())  # as it should be
    index = tmp_path / SHARDS_DIR / ".metadata"
    index.write_bytes(pickle.dumps(Payload()))
    state.shards = {**digests, ".metadata": file_digest(index)}  # (its digest matches)
    save(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"names \S*print, which could run code"):
        load(tmp_path)
    assert "this ran" not in capsys.readouterr().out


def test_epoch_seeds_depend_on_seed_epoch_and_rank_only():
    seed_epoch(0, 3, 1)
    a = torch.rand(4)
    torch.rand(100)  # whatever ran before does not matter
    seed_epoch(0, 3, 1)
    assert torch.equal(torch.rand(4), a)
    seed_epoch(0, 3, 0)
    assert not torch.equal(torch.rand(4), a)


def test_a_continued_run_keeps_its_schedule_and_refuses_weights_that_do_not_fit():
    from trainyard.pipelines.config.spec import RunSpec
    from trainyard.pipelines.driver.resume import Place, check_model_loads, resume_changes
    from trainyard.pipelines.driver.trainer import schedule_steps

    spec = RunSpec.from_dict({"data": {"path": "x"}, "train": {"epochs": 4}})
    raised = RunSpec.from_dict({"data": {"path": "x"}, "train": {"epochs": 6, "lr": 0.01}})
    assert resume_changes(spec.to_dict(), raised) == []  # more epochs, another lr: fine
    place = Place("u", "s", "r", "id", TrainingState({}, epoch=4, schedule_steps=40), None)
    assert schedule_steps(raised, 10, place) == 40  # not 60: no jump in the learning rate
    assert schedule_steps(raised, 10, Place("u", "s", "r", None, None, None)) == 60
    recipe = {"name": "mlp", "kwargs": {"in_features": 4, "out_features": 3, "hidden": [8]}}
    weights = build_model(recipe).state_dict()
    check_model_loads(recipe, weights)
    wider = {"name": "mlp", "kwargs": {"in_features": 4, "out_features": 3, "hidden": [16]}}
    with pytest.raises(
        SpecError, match=r"tensor net.0.bias is \(8,\) in the checkpoint, \(16,\) in the model"
    ):
        check_model_loads(wider, weights)
