"""The epoch functions on plain tensors, without Ray or torch.distributed (and, on the session
cluster, how a worker keeps its share of small data)."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from trainyard.pipelines.config.train import TrainSpec
from trainyard.pipelines.training.optim import lr_factor, make_scheduler, resolve_amp
from trainyard.pipelines.training.step import evaluate, param_digest, task_loss, train_epoch


def batches(x, y, size):
    return [{"x": x[i : i + size], "y": y[i : i + size]} for i in range(0, len(x), size)]


def data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return x, y


def run_epoch(model, x, y, micro, accum, steps, amp=None, clip=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = make_scheduler(
        optimizer, TrainSpec(schedule="constant", warmup_fraction=0.0), steps
    )
    scaler = torch.amp.GradScaler("cpu", enabled=amp == torch.float16)
    return train_epoch(
        model,
        batches(x, y, micro),
        optimizer,
        scheduler,
        scaler,
        loss_fn=task_loss("classification"),
        steps=steps,
        accum=accum,
        amp_dtype=amp,
        grad_clip=clip,
    )


def test_lr_schedule_warms_up_then_decays():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(80, 100, 10, "constant") == 1.0


def test_train_epoch_learns_and_counts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    x, y = data()
    loss_fn = task_loss("classification")
    before = evaluate(model, batches(x, y, 64), task="classification", loss_fn=loss_fn)
    for _ in range(5):
        stats = run_epoch(model, x, y, micro=32, accum=1, steps=8)
    after = evaluate(model, batches(x, y, 64), task="classification", loss_fn=loss_fn)
    assert stats.steps == 8 and stats.samples == 256
    assert after["val_loss"] < before["val_loss"] / 2 and after["val_accuracy"] > 0.9
    assert 0.0 <= stats.data_wait_share <= 1.0


def test_gradient_accumulation_matches_a_full_batch():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    twin = copy.deepcopy(model)
    x, y = data(64)
    run_epoch(model, x, y, micro=16, accum=4, steps=1)
    run_epoch(twin, x, y, micro=64, accum=1, steps=1)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_train_epoch_stops_at_steps_and_fails_when_data_runs_out():
    model = nn.Linear(4, 2)
    x, y = data(64)
    assert run_epoch(model, x, y, micro=16, accum=1, steps=2).samples == 32
    with pytest.raises(RuntimeError, match="data ran out after 4 of 5 steps"):
        run_epoch(model, x, y, micro=16, accum=1, steps=5)


def test_an_epoch_cut_short_by_a_notice_resumes_where_it_stopped_exactly():
    """A check that returns a notice after the 3rd of 8 steps (accumulating 2 micro-batches)
    ends the epoch there; the same epoch started again from those steps' stats, on the batches
    after them, with the optimizer and schedule as they were, ends as the uninterrupted epoch:
    the same weights, steps and loss."""
    from trainyard.pipelines.training.preemption import in_epoch, resumed_stats

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = data()
    loss_fn, steps = task_loss("classification"), 8

    def parts(net):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        spec = TrainSpec(schedule="cosine", warmup_fraction=0.0)
        return optimizer, make_scheduler(optimizer, spec, steps), torch.amp.GradScaler("cpu")

    def epoch(net, optimizer, scheduler, scaler, data, **kw):
        return train_epoch(
            net, data, optimizer, scheduler, scaler, loss_fn=loss_fn, steps=steps, accum=2, **kw
        )

    straight = copy.deepcopy(model)
    whole = epoch(straight, *parts(straight), batches(x, y, 16))
    calls = []

    def check():
        calls.append(len(calls) + 1)
        return "notice" if len(calls) == 3 else None

    optimizer, scheduler, scaler = parts(model)
    cut = epoch(model, optimizer, scheduler, scaler, batches(x, y, 16), check=check)
    assert (cut.notice, cut.steps, calls) == ("notice", 3, [1, 2, 3])
    start = resumed_stats(in_epoch(cut, cut.loss * cut.samples, cut.samples), first=True)
    rest = epoch(model, optimizer, scheduler, scaler, batches(x, y, 16)[3 * 2 :], start=start)
    assert (rest.notice, rest.steps, rest.samples) == (None, steps, whole.samples)
    assert rest.loss == pytest.approx(whole.loss, rel=1e-6)
    for a, b in zip(model.parameters(), straight.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_amp_paths_train_on_cpu(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    before = param_digest(model)
    x, y = data()
    stats = run_epoch(model, x, y, micro=32, accum=1, steps=8, amp=dtype, clip=1.0)
    assert math.isfinite(stats.loss) and param_digest(model) != before


def test_regression_metrics():
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    y = torch.tensor([1.0, 2.0, 3.0, 5.0])  # one residual of 1
    out = evaluate(
        model,
        [{"x": x, "y": y}],
        task="regression",
        loss_fn=task_loss("regression"),
        target_std=2.0,
    )
    assert out["val_loss"] == pytest.approx(0.25)
    assert out["val_rmse"] == pytest.approx(math.sqrt(0.25) * 2.0)
    sst = float(((y - y.mean()) ** 2).sum())
    assert out["val_r2"] == pytest.approx(1 - 1.0 / sst)


def test_amp_resolution():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None and resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    assert resolve_amp("fp16", cpu) is torch.float16


def test_memory_batches_are_a_seeded_permutation_of_every_row():
    from trainyard.pipelines.training.feed import memory_batches

    rows = {"x": torch.arange(10).float().unsqueeze(1), "y": torch.arange(10)}
    first = [b["y"].tolist() for b in memory_batches(rows, 4, seed=7, drop_last=True)]
    again = [b["y"].tolist() for b in memory_batches(rows, 4, seed=7, drop_last=True)]
    other = [b["y"].tolist() for b in memory_batches(rows, 4, seed=8, drop_last=True)]
    assert first == again and first != other  # the same pass from the same seed alone
    assert [len(b) for b in first] == [4, 4]  # drop_last: the 2 rows left over wait
    every = [y for b in memory_batches(rows, 4, {"x": torch.float64}, seed=7) for y in b["y"]]
    assert sorted(every) == list(range(10))
    batch = next(iter(memory_batches(rows, 3, {"x": torch.float64})))
    assert batch["x"].dtype == torch.float64 and batch["y"].tolist() == [0, 1, 2]


def step_rows(rank_batches, world: int, micro: int, steps: int) -> list[list[int]]:
    """The rows (y) of each optimizer step of a global batch of 12 that `world` ranks split,
    `rank_batches(r)` giving rank r's micro-batches of `micro` rows; every rank takes as many."""
    accum = 12 // (world * micro)
    ranks = [[b["y"].tolist() for b in rank_batches(r)] for r in range(world)]
    assert all(len(b) == micro for r in ranks for b in r)
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == steps * accum
    return [
        sorted(y for r in ranks for b in r[s * accum : (s + 1) * accum] for y in b)
        for s in range(steps)
    ]


def test_global_batches_are_the_same_at_any_world_size():
    """Each optimizer step trains on the same rows whether 1, 2 or 3 workers split it (and
    however each splits it into micro-batches); only the seed changes the order."""
    from trainyard.pipelines.training.feed import global_batches

    rows = {"x": torch.arange(50).float().unsqueeze(1), "y": torch.arange(50)}

    def steps(world: int, micro: int, seed: int = 7) -> list[list[int]]:
        # 50 // 12 steps; the 2 rows left over wait
        return step_rows(lambda r: global_batches(rows, 12, micro, r, world, seed), world, micro, 4)

    alone = steps(1, 12)
    assert steps(2, 6) == steps(2, 3) == steps(3, 4) == steps(3, 2) == alone
    assert len({y for s in alone for y in s}) == 48
    assert steps(2, 6, seed=8) != alone


def _blocks(*columns: np.ndarray) -> tuple[list, dict]:
    """Blocks as the driver hands them out, (key, rows, bytes), and the fetch that reads them."""
    store = {i: {"x": c.astype(np.float32)[:, None], "y": c} for i, c in enumerate(columns)}
    return [(i, len(c), c.nbytes) for i, c in enumerate(columns)], store.__getitem__


def test_each_rank_keeps_a_strided_share_of_every_row():
    from trainyard.pipelines.training.feed import load_share, share_batches

    blocks, fetch = _blocks(np.arange(4), np.arange(4, 9), np.arange(9, 11))
    cpu = torch.device("cpu")
    shares = [load_share(blocks, r, 3, cpu, fetch) for r in range(3)]
    assert [s["y"].tolist() for s in shares] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert load_share(blocks, 0, 1, cpu, fetch)["y"].tolist() == list(range(11))
    # streamed: the same rows, in batches
    streamed = [[b["y"].tolist() for b in share_batches(blocks, 2, r, 3, cpu, fetch=fetch)]
                for r in range(3)]  # fmt: skip
    assert [sum(bs, []) for bs in streamed] == [s["y"].tolist() for s in shares]
    assert max(len(b) for bs in streamed for b in bs) == 2


def test_streamed_passes_are_the_same_global_batches_at_any_world_size():
    """A streamed pass (blocks in a seeded order, rows permuted within windows of blocks) gives
    each optimizer step the same rows on 1, 2 or 3 workers, each row at most once, the pass
    drawn from the seed alone; micro-batches that span two windows are whole."""
    from trainyard.pipelines.training.feed import window_batches

    blocks, fetch = _blocks(*np.array_split(np.arange(100), 7))  # 7 blocks of 14-15 rows
    cpu = torch.device("cpu")

    def steps(world: int, micro: int, seed: int = 7, window: int = 100) -> list[list[int]]:
        def rank(r: int):
            return window_batches(
                blocks, 12, micro, r, world, seed, cpu, window_bytes=window, fetch=fetch
            )

        return step_rows(rank, world, micro, 8)  # 100 // 12 steps; the 4 rows left over wait

    alone = steps(1, 12)
    assert steps(2, 6) == steps(3, 4) == steps(3, 2) == steps(2, 3) == alone
    assert len({y for s in alone for y in s}) == 96
    assert steps(2, 6, seed=8) != alone
    # Windows of two or more blocks (a row's window mixes blocks): the same at any size too.
    wide = steps(1, 12, window=200)
    assert steps(3, 2, window=200) == wide != alone
    # dtypes as asked
    batch = next(window_batches(blocks, 12, 4, 0, 1, 7, cpu, {"x": torch.float64}, fetch=fetch))
    assert batch["x"].dtype == torch.float64 and batch["y"].dtype == torch.int64


def test_streamed_batches_of_class_sorted_rows_mix_classes_like_iid_draws(ray_cluster):
    """The shuffle-quality bound: a table whose blocks each hold one class (as a class-sorted
    file, or the split's grouping, leaves them) is put in a random order once, then streamed;
    each batch's share of each class spreads no more than in batches drawn i.i.d. (within 25 %
    of the binomial spread), though each window is one block (a table many times the window).
    Streamed without the reordering, every batch holds one class."""
    import pyarrow as pa
    import ray.data

    from trainyard.pipelines.data.common import block_refs, in_random_order
    from trainyard.pipelines.training.feed import window_batches

    classes, per_class, batch = 4, 6000, 256
    y = np.repeat(np.arange(classes), per_class)  # sorted by class: 8 blocks of one class each
    sorted_rows = ray.data.from_arrow(pa.table({"x": y.astype(np.float32), "y": y}))
    sorted_rows = sorted_rows.repartition(8).materialize()
    cpu = torch.device("cpu")

    def spread(ds) -> float:
        shares = [
            np.bincount(b["y"].numpy(), minlength=classes) / batch
            for b in window_batches(block_refs(ds), batch, batch, 0, 1, 3, cpu, window_bytes=1)
        ]
        return float(np.std(np.array(shares), axis=0).mean())

    iid = np.sqrt(0.25 * 0.75 / batch)  # a class's share in i.i.d. batches: its binomial spread
    assert spread(sorted_rows) > 10 * iid  # one class a batch
    reordered = in_random_order(sorted_rows, 0, 8, 0.5)
    assert spread(reordered) < 1.25 * iid
    # the same order every time, every row once; in any number of blocks
    assert (
        reordered.take_batch(50)["y"].tolist()
        == in_random_order(sorted_rows, 0, 8, 0.5).take_batch(50)["y"].tolist()
    )
    one = in_random_order(sorted_rows, 0, 1, 0.5)
    assert one.num_blocks() == 1 and sorted(one.to_pandas()["y"]) == y.tolist()
