"""FSDP2 beside DDP on a real two-rank gloo group (two processes, no Ray): the same losses from
the same start, half the parameter bytes per rank, whole state dicts that load anywhere, and the
blocks of built-in and user models found by class name."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from ranks import on_ranks
from torch import nn

from trainyard.cluster.errors import SpecError
from trainyard.models import build_model
from trainyard.pipelines.config.train import TrainSpec
from trainyard.pipelines.training import checkpoint as checkpoints
from trainyard.pipelines.training import parallel
from trainyard.pipelines.training.optim import make_optimizer, make_scheduler
from trainyard.pipelines.training.step import evaluate, param_digest, task_loss, train_epoch

GPT = {"vocab_size": 64, "context": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0}
STEPS = 4


class Stack(nn.Module):
    """A user's model: its repeated blocks are `Layer`s in a plain Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*(Layer() for _ in range(3)))
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


def _whole(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The whole model's and optimizer's state dicts on rank 0 (a collective)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (
        get_model_state_dict(model, options=options),
        get_optimizer_state_dict(model, optimizer, options=options),
    )


def _batches(rank: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    return [
        {"x": (x := torch.randint(0, 64, (4, 16), generator=g)), "y": torch.roll(x, -1, 1)}
        for _ in range(STEPS)
    ]


def _train(rank: int, strategy: str, amp: torch.dtype | None, out: Path) -> dict:
    torch.manual_seed(0)
    model = build_model("gpt", **GPT)
    full_bytes = parallel.local_bytes(model.parameters())
    blocks = parallel.block_names(model)
    if strategy == "fsdp+ac":
        assert parallel.checkpoint_blocks(model, blocks) == GPT["n_layer"]
    if strategy.startswith("fsdp"):
        offload = strategy == "fsdp+offload"  # (on CPUs: the same code path, nothing moves)
        model = parallel.shard(model, torch.device("cpu"), 2, blocks, amp, offload)
    else:
        model = nn.parallel.DistributedDataParallel(model)
    train = TrainSpec(warmup_fraction=0.0, lr=1e-2)
    optimizer = make_optimizer(model, train)
    scheduler = make_scheduler(optimizer, train, STEPS)
    scaler = parallel.grad_scaler(torch.device("cpu"), amp, sharded=strategy != "ddp")
    for epoch in range(2):  # two epochs of a step each, both ending with an evaluation
        stats = train_epoch(
            model,
            _batches(rank)[2 * epoch :],
            optimizer,
            scheduler,
            scaler,
            loss_fn=task_loss("language_model"),
            steps=1,
            accum=2,
            amp_dtype=None if strategy != "ddp" else amp,
            grad_clip=0.5,
        )
        # Validation: rank 1 has one batch fewer; under FSDP it keeps step with rank 0.
        metrics = evaluate(
            model, _batches(rank)[: 3 - rank], task="language_model", loss_fn=task_loss("lm")
        )
    model_state, optim_state = _whole(model, optimizer)
    saved = {}
    if (strategy, amp) == ("fsdp", None):  # a checkpoint as the loop writes it, each rank's part
        part = out / f"rank{rank}"
        part.mkdir()
        groups, digests = checkpoints.save_shards(model, optimizer, part / checkpoints.SHARDS_DIR)
        saved = {"part": part, "groups": groups, "digests": digests}
    return {
        "saved": saved,
        "loss": stats.loss,
        "skipped": stats.skipped,
        "val_loss": metrics["val_loss"],
        "digest": param_digest(model),
        "held": parallel.local_bytes(model.parameters()),
        "full": full_bytes,
        "blocks": blocks,
        "model_state": model_state,
        "optim_state": optim_state,
    }


def _worker(rank: int, results, cases: list, out: Path) -> None:
    for strategy, amp in cases:
        results[(rank, strategy, str(amp))] = _train(rank, strategy, amp, out)
    # A user's model, its blocks named: sharded, trained a step, gathered whole.
    torch.manual_seed(0)
    net = parallel.shard(Stack(), torch.device("cpu"), 2, ["Layer"], None)
    optimizer = torch.optim.AdamW(net.parameters())
    net(torch.randn(4, 16)).square().mean().backward()
    optimizer.step()
    state, _ = _whole(net, optimizer)
    results[(rank, "stack")] = {"held": parallel.local_bytes(net.parameters()), "state": state}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    cases = [("ddp", None), ("fsdp", None), ("fsdp+ac", None), ("fsdp+offload", None)]
    cases += [("fsdp", torch.bfloat16), ("fsdp", torch.float16)]
    out = tmp_path_factory.mktemp("ranks")
    results = on_ranks(_worker, 2, cases, out)
    # Both ranks' parts merged into one directory, as Ray Train does, with rank 0's state file.
    merged = out / "checkpoint"
    for rank in (0, 1):
        shutil.copytree(
            results[(rank, "fsdp", "None")]["saved"]["part"], merged, dirs_exist_ok=True
        )
    first = results[(0, "fsdp", "None")]["saved"]
    state = checkpoints.TrainingState(
        model={}, epoch=1, optimizer={"param_groups": first["groups"]}, shards=first["digests"]
    )
    checkpoints.save(merged, state)
    return results | {"checkpoint": merged}


def test_fsdp_trains_like_ddp_on_half_the_bytes(trained):
    ddp, fsdp = trained[(0, "ddp", "None")], trained[(0, "fsdp", "None")]
    assert ddp["blocks"] == ["Block"]
    # The same start, batches and clipping: the same losses to float rounding.
    assert fsdp["loss"] == pytest.approx(ddp["loss"], rel=1e-5)
    assert fsdp["val_loss"] == pytest.approx(ddp["val_loss"], rel=1e-5)
    assert trained[(1, "fsdp", "None")]["val_loss"] == fsdp["val_loss"]  # all ranks' batches
    # Each rank holds half the parameters (the shards are padded to equal sizes).
    for rank in (0, 1):
        held = trained[(rank, "fsdp", "None")]["held"]
        assert 0.5 <= held / fsdp["full"] < 0.52
    assert ddp["held"] == ddp["full"]
    # The whole parameters, gathered, agree on both ranks and with DDP's within rounding.
    assert fsdp["digest"] == trained[(1, "fsdp", "None")]["digest"]
    for name, value in ddp["model_state"].items():
        assert torch.allclose(fsdp["model_state"][name], value, atol=1e-5), name


def test_activation_checkpointing_and_offload_change_memory_not_results(trained):
    fsdp, ac = trained[(0, "fsdp", "None")], trained[(0, "fsdp+ac", "None")]
    assert ac["loss"] == pytest.approx(fsdp["loss"], rel=1e-6)
    assert trained[(0, "fsdp+offload", "None")]["digest"] == fsdp["digest"]
    assert ac["model_state"].keys() == fsdp["model_state"].keys()  # no wrapper in the names


def test_a_users_model_shards_by_the_blocks_named(trained):
    whole = sum(p.numel() * 4 for p in Stack().parameters())
    assert trained[(0, "stack")]["held"] / whole == pytest.approx(0.5, abs=0.02)
    Stack().load_state_dict(trained[(0, "stack")]["state"])  # every name, whole
    assert trained[(1, "stack")]["state"] == {}  # gathered to rank 0 only


def test_mixed_precision_under_fsdp_trains(trained):
    for amp in ("torch.bfloat16", "torch.float16"):
        r = trained[(0, "fsdp", amp)]
        assert torch.isfinite(torch.tensor(r["loss"])) and r["loss"] < 5.0
        # Parameters and optimizer state stay fp32 in the gathered state.
        assert all(v.dtype == torch.float32 for v in r["model_state"].values())


def test_a_whole_state_loads_without_torch_distributed_at_another_world_size(trained):
    """What FSDP on 2 ranks saved loads into one process, model and optimizer, and trains on."""
    saved = trained[(0, "fsdp", "None")]
    torch.manual_seed(1)
    model = build_model("gpt", **GPT)
    model.load_state_dict(saved["model_state"])
    optimizer = make_optimizer(model, TrainSpec())
    make_scheduler(optimizer, TrainSpec(), STEPS)  # (as the loop builds them, before loading)
    # (a copy: the optimizer keeps the step counts it loads, and its step would change them)
    parallel.load_optimizer(model, optimizer, copy.deepcopy(saved["optim_state"]))
    moments = [s["exp_avg"] for s in optimizer.state.values()]
    assert len(moments) == len(list(model.parameters()))  # (each once: head and wte are tied)
    assert all(m.abs().sum() > 0 for m in moments)
    x = torch.randint(0, 64, (2, 16))
    loss = task_loss("lm")(model(x), torch.roll(x, -1, 1))
    loss.backward()
    optimizer.step()


def _resume_at_three(rank: int, results, checkpoint: Path) -> None:
    """The checkpoint 2 FSDP ranks wrote, loaded by 3 FSDP ranks (shards of other sizes) as the
    loop loads it, and trained a step."""
    torch.manual_seed(1)  # (other initial weights: the checkpoint's must replace them)
    model = parallel.shard(build_model("gpt", **GPT), torch.device("cpu"), 3, ["Block"], None)
    optimizer = make_optimizer(model, TrainSpec())
    make_scheduler(optimizer, TrainSpec(), STEPS)  # (as the loop builds them, before loading)
    state = checkpoints.load(checkpoint, tensors=False)
    shards = checkpoint / checkpoints.SHARDS_DIR
    checkpoints.load_shards(model, optimizer, shards, state.optimizer["param_groups"])
    model_state, optim_state = _whole(model, optimizer)  # (rank 0's; the others' are empty)
    if rank == 0:
        results[(rank, "loaded")] = {"model": model_state, "optim": optim_state["state"]}
    moments = [s["exp_avg"].to_local() for s in optimizer.state.values()]
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(rank))
    task_loss("lm")(model(x), torch.roll(x, -1, 1)).backward()
    optimizer.step()
    results[rank] = {
        "held": parallel.local_bytes(model.parameters()),
        "moments": sum(float(m.abs().sum()) for m in moments),
        "digest": param_digest(model),
    }


def test_a_checkpoint_of_two_ranks_resumes_sharded_over_three_and_whole_in_one(trained):
    """Each of 2 FSDP ranks wrote its shards (DCP) into a directory of its own, merged as Ray
    Train merges them: 3 ranks load it exactly (model and optimizer), and so does one process
    without torch.distributed (the driver, logging the model)."""
    saved = trained[(0, "fsdp", "None")]
    checkpoint = trained["checkpoint"]
    files = sorted(p.name for p in (checkpoint / checkpoints.SHARDS_DIR).iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own
    results = on_ranks(_resume_at_three, 3, checkpoint)
    loaded = results[(0, "loaded")]
    for name, value in saved["model_state"].items():
        assert torch.equal(loaded["model"][name], value), name
    for name, moments in saved["optim_state"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(loaded["optim"][name][key], value), (name, key)
    ranks = [results[r] for r in range(3)]
    assert sum(r["held"] for r in ranks) / saved["full"] == pytest.approx(1, abs=0.02)
    assert all(r["moments"] > 0 for r in ranks)  # each rank got its moments' shard
    assert len({r["digest"] for r in ranks}) == 1  # one model after the step
    whole = checkpoints.load(checkpoint)  # no process group here
    assert whole.model.keys() == saved["model_state"].keys()
    assert all(torch.equal(whole.model[k], v) for k, v in saved["model_state"].items())
    assert whole.optimizer["param_groups"] == saved["optim_state"]["param_groups"]
    build_model("gpt", **GPT).load_state_dict(whole.model)


def test_a_checkpoint_with_a_tensor_file_changed_or_missing_is_refused(trained, tmp_path):
    copy = tmp_path / "checkpoint"
    shutil.copytree(trained["checkpoint"], copy)
    part = copy / checkpoints.SHARDS_DIR / "__1_0.distcp"
    part.write_bytes(part.read_bytes()[:-8])
    for tensors in (True, False):  # (False: as the workers load it, reading their shards after)
        with pytest.raises(checkpoints.CheckpointError, match=r"corrupt \(shards/__1_0.distcp"):
            checkpoints.load(copy, tensors=tensors)
    # The driver reads the state and the index only, wherever the checkpoint is: a file cut
    # short is seen by its size.
    local = pafs.LocalFileSystem()
    with pytest.raises(checkpoints.CheckpointError, match=r"__1_0.distcp is cut short"):
        checkpoints.load_state(local, str(copy))
    part.unlink()  # (a rank's part that never arrived)
    with pytest.raises(checkpoints.CheckpointError, match=r"incomplete \(no shards/__1_0"):
        checkpoints.load(copy, tensors=False)
    with pytest.raises(checkpoints.CheckpointError, match=r"incomplete \(no shards/__1_0"):
        checkpoints.load_state(local, str(copy))
    shutil.copy(Path(trained["checkpoint"]) / checkpoints.SHARDS_DIR / "__1_0.distcp", part)
    state = checkpoints.load_state(local, str(copy))
    whole = checkpoints.load(copy, optimizer=False)
    assert state.optimizer is None and state.epoch == whole.epoch
    assert {k: (v.shape, v.dtype) for k, v in state.model.items()} == {
        k: (v.shape, v.dtype) for k, v in whole.model.items()
    }


def test_dry_run_sizes_the_gpt_and_what_each_worker_holds(capsys):
    """No Ray, no data: the spec gives GPT's shape (the tokenizer's vocabulary, the context)."""
    from trainyard.pipelines.cli import main

    config = "configs/stdlib-gpt-tiny.yaml"
    assert main(["train", config, "--dry-run", "--set", "scaling.strategy=fsdp"]) == 0
    out = capsys.readouterr().out
    assert "gpt(vocab_size=256, context=128, n_layer=4" in out and "0.837M parameters" in out
    tiny = build_model("gpt", vocab_size=256, context=128, n_layer=4, n_head=4, n_embd=128)
    params = sum(p.numel() for p in tiny.parameters())
    held = parallel.per_rank_bytes(params, "fsdp", 2, "adamw")
    assert f"each worker holds {parallel.describe_bytes(held)} (fsdp over 2 worker(s)" in out


def test_blocks_are_found_by_class_name_and_a_wrong_name_is_one_line():
    assert parallel.block_names(build_model("mlp", in_features=4, out_features=2)) == ["Linear"]
    net = Stack()
    # No declared blocks and no ModuleList: the whole model is one unit unless named.
    assert parallel.block_names(net) == []
    assert parallel.block_names(net, ["Layer"]) == ["Layer"]
    assert [type(b).__name__ for b in parallel.blocks_of(net, ["Layer"])] == ["Layer"] * 3
    with pytest.raises(SpecError, match=r"scaling.blocks: Blok match\(es\) no module of Stack"):
        parallel.block_names(net, ["Blok"])
    held = parallel.per_rank_bytes(1000, "fsdp", 3, "adamw")
    assert held == {"parameters": 1336, "gradients": 1336, "optimizer": 2672}
    assert sum(parallel.per_rank_bytes(1000, "ddp", 3, "adamw").values()) == 16000
