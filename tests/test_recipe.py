"""The training recipe a user brings, as plain functions (no Ray): optimizer and scheduler
classes with their arguments, the warm-up before them and their state across a resume; a
model's own loss under nanoGPT's and Hugging Face's conventions, equal to trainyard's own
cross-entropy on the same batch; torchmetrics' metrics, the same on one rank and two (a real
gloo group) and equal to scikit-learn's; the monitor's best epoch and early stopping."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from ranks import on_ranks
from torch import nn

from trainyard.cluster.errors import SpecError
from trainyard.models.outputs import logits, model_loss
from trainyard.pipelines.config.spec import RunSpec
from trainyard.pipelines.config.train import TrainSpec
from trainyard.pipelines.training.monitor import Progress
from trainyard.pipelines.training.optim import make_optimizer, make_scheduler
from trainyard.pipelines.training.scores import make_scores
from trainyard.pipelines.training.step import evaluate, forward_loss, own_loss, task_loss

OWN_CODE = Path(__file__).resolve().parent.parent / "examples" / "own-code"


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def _lrs(train: TrainSpec, steps_per_epoch: int, epochs: int, state=None, skip=0, stop=None):
    """The learning rate of every step, as the loop steps the schedule (an evaluation after
    every epoch, val_loss flat); with `state` (the schedule's and the optimizer's, as a
    checkpoint holds them), resumed after `skip` epochs; stopped after `stop`."""
    net = _net()
    optimizer = make_optimizer(net, train)
    schedule = make_scheduler(optimizer, train, steps_per_epoch * epochs, epochs)
    if state is not None:
        schedule.load_state_dict(state[0])
        optimizer.load_state_dict(state[1])
    seen = []
    for _ in range(skip, stop or epochs):
        for _ in range(steps_per_epoch):
            seen.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
        schedule.evaluated({"val_loss": 1.0})
    return seen, (schedule.state_dict(), optimizer.state_dict())


def test_an_optimizer_class_gets_its_arguments_and_decay_skips_biases_and_norms():
    train = TrainSpec(optimizer="torch.optim:Adadelta", optimizer_args={"rho": 0.8}, lr=1.0)
    optimizer = make_optimizer(_net(), train)
    assert type(optimizer) is torch.optim.Adadelta
    decayed, plain = optimizer.param_groups
    assert [p.dim() for p in decayed["params"]] == [2, 2] and decayed["weight_decay"] == 1e-4
    assert {p.dim() for p in plain["params"]} == {1} and plain["weight_decay"] == 0.0
    assert decayed["rho"] == 0.8 and decayed["lr"] == 1.0
    # A class that takes no weight_decay gets one group and none.
    rprop = make_optimizer(_net(), TrainSpec(optimizer="torch.optim:Rprop"))
    assert len(rprop.param_groups) == 1 and "weight_decay" not in rprop.param_groups[0]
    for train, message in [
        (TrainSpec(optimizer="torch.nn:Linear"), "torch.nn:Linear is the class Linear, not a"),
        (
            TrainSpec(optimizer="torch.optim:Adadelta", optimizer_args={"rhoo": 0.9}),
            "train.optimizer_args: torch.optim:Adadelta takes no argument 'rhoo'",
        ),
        (
            TrainSpec(optimizer="torch.optim:Adadelta", optimizer_args={"rho": 2.0}),
            "train.optimizer: building torch.optim:Adadelta with lr=0.001, rho=2.0 failed",
        ),
    ]:
        with pytest.raises(SpecError, match=message.replace("(", r"\(")):
            make_optimizer(_net(), train)
    with pytest.raises(SpecError, match="train.optimizer_args.lr: set by train.lr"):
        TrainSpec(optimizer_args={"lr": 1.0})


def test_a_scheduler_class_steps_per_epoch_or_after_a_warm_up_and_resumes():
    # pytorch/examples' StepLR(step_size=1, gamma=0.7), stepped after every epoch.
    step_lr = TrainSpec(
        optimizer="torch.optim:Adadelta",
        lr=1.0,
        schedule="torch.optim.lr_scheduler:StepLR",
        schedule_args={"step_size": 1, "gamma": 0.7},
        schedule_interval="epoch",
        warmup_fraction=0.0,
    )
    lrs, _ = _lrs(step_lr, steps_per_epoch=3, epochs=4)
    assert lrs == pytest.approx([0.7**e for e in range(4) for _ in range(3)])
    # A linear warm-up over 4 of 20 steps before a cosine that gets T_max (16) from trainyard.
    cosine = TrainSpec(
        lr=0.1, schedule="torch.optim.lr_scheduler:CosineAnnealingLR", warmup_fraction=0.2
    )
    lrs, _ = _lrs(cosine, steps_per_epoch=5, epochs=4)
    assert lrs[:5] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])
    after = [0.1 * (1 + math.cos(math.pi * k / 16)) / 2 for k in range(16)]
    assert lrs[4:] == pytest.approx(after)
    # Resumed after two epochs from the state the schedule had: the same rates on.
    for train in (step_lr, cosine):
        whole, _ = _lrs(train, 5, 4)
        first, state = _lrs(train, 5, 4, stop=2)
        rest, _ = _lrs(train, 5, 4, state=state, skip=2)
        assert first + rest == whole
    # ReduceLROnPlateau: after the warm-up, stepped with the monitor at each evaluation.
    plateau = TrainSpec(
        lr=0.1, schedule="torch.optim.lr_scheduler:ReduceLROnPlateau",
        schedule_args={"patience": 0, "factor": 0.5}, warmup_fraction=0.375,
    )  # fmt: skip
    lrs, _ = _lrs(plateau, steps_per_epoch=4, epochs=4)  # (a flat val_loss: bad from the 2nd)
    warm = [0.1 * k / 6 for k in range(1, 7)]
    assert lrs == pytest.approx(warm + [0.1] * 2 + [0.1] * 4 + [0.05] * 4)
    with pytest.raises(SpecError, match="train.schedule_args: .*StepLR takes no argument 'step'"):
        _lrs(TrainSpec(schedule="torch.optim.lr_scheduler:StepLR", schedule_args={"step": 1}), 1, 1)
    with pytest.raises(SpecError, match="torch.optim:SGD is the class SGD, not a torch LR"):
        _lrs(TrainSpec(schedule="torch.optim:SGD"), 1, 1)
    with pytest.raises(SpecError, match="missing 1 required positional argument: 'step_size'"):
        _lrs(TrainSpec(schedule="torch.optim.lr_scheduler:StepLR"), 1, 1)


def _text_spec(model: str, **model_keys) -> RunSpec:
    return RunSpec.from_dict(
        {
            "pipeline": "text",
            "data": {"path": "builtin:python-stdlib"},
            "model": {"name": model, "args": {"context": 16}, **model_keys},
            "train": {"loss": "model"},
        }
    )


def test_a_nanogpt_models_own_loss_is_trainyards_cross_entropy_on_the_next_tokens(monkeypatch):
    monkeypatch.syspath_prepend(str(OWN_CODE))
    from models.nanogpt import gpt

    torch.manual_seed(0)
    net = gpt(vocab_size=64, context=16).eval()
    x = torch.randint(0, 64, (3, 16))
    y = torch.roll(x, -1, 1)  # (the text pipeline's next tokens)
    own = own_loss(_text_spec("models.nanogpt:gpt"), net)
    assert (own.targets_arg, own.targets_are_inputs) == ("targets", False)
    loss, out = forward_loss(net, x, y, own)
    assert out.shape == (3, 16, 64)  # given targets: every position's logits
    assert loss.item() == pytest.approx(task_loss("language_modeling")(out, y).item(), rel=1e-6)
    # Without targets (sampling): the last position only, which is all sampling needs.
    assert logits(net(x)).shape == (3, 1, 64)
    # Validation: the same loss per token, and the accuracy of the logits that came with it.
    theirs = evaluate(net, [{"x": x, "y": y}], task="language_modeling", loss_fn=own)
    accuracy = (out.argmax(-1) == y).float().mean().item()
    assert theirs == pytest.approx({"val_loss": loss.item(), "val_accuracy": accuracy}, rel=1e-6)


def test_a_hugging_face_causal_lm_is_given_its_inputs_and_shifts_them_itself():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2, use_cache=False
    )
    torch.manual_seed(0)
    net = transformers.GPT2LMHeadModel(config).eval()
    x = torch.randint(0, 64, (3, 16))
    y = torch.roll(x, -1, 1)
    own = own_loss(_text_spec("hf:gpt2"), net)
    assert (own.targets_arg, own.targets_are_inputs) == ("labels", True)
    loss, out = forward_loss(net, x, y, own)
    # Its loss is trainyard's cross-entropy of the next tokens at every position but the last
    # (whose next token is not in its input).
    ours = task_loss("language_modeling")(out[:, :-1], y[:, :-1])
    assert loss.item() == pytest.approx(ours.item(), rel=1e-5)
    # Given the next tokens instead, it would learn to predict two tokens ahead.
    two_ahead = model_loss(net(x, labels=y))
    assert two_ahead.item() == pytest.approx(
        task_loss("language_modeling")(out[:, :-1], torch.roll(y, -1, 1)[:, :-1]).item(), rel=1e-5
    )
    assert (
        own_loss(_text_spec("hf:gpt2", targets_are_inputs=False), net).targets_are_inputs is False
    )


def test_the_loss_is_read_from_each_convention_and_a_forward_without_targets_is_refused():
    t = torch.tensor(1.5)
    assert model_loss({"logits": t, "loss": t}) is t
    assert model_loss((torch.zeros(2), t)) is t
    assert model_loss(type("Out", (), {"loss": t})()) is t
    with pytest.raises(TypeError, match="returned Tensor and no loss"):
        model_loss(torch.zeros(2))
    spec = RunSpec.from_dict(
        {
            "data": {"path": "builtin:digits"},
            "model": {"name": "torch.nn:Identity"},
            "train": {"loss": "model"},
        }
    )
    with pytest.raises(SpecError, match="Identity.forward takes no argument 'targets'"):
        own_loss(spec, nn.Identity())


def _batches_of(rank: int, world: int, n: int = 203, classes: int = 3) -> list[dict]:
    """Rows i % world == rank of one fixed set, in batches of 16 (as validation shares them)."""
    g = torch.Generator().manual_seed(7)
    out, y = torch.randn(n, classes, generator=g), torch.randint(0, classes, (n,), generator=g)
    out[y == 1, 1] += 1.0  # (better than chance)
    mine = torch.arange(rank, n, world)
    return [{"x": out[mine[i : i + 16]], "y": y[mine[i : i + 16]]} for i in range(0, len(mine), 16)]


METRICS = ["accuracy", "f1", "precision", "recall", "auroc", "top2"]


def _scored(rank: int, world: int, classes: int) -> dict[str, float]:
    scores = make_scores(METRICS, "classification", classes)
    return evaluate(
        _Passthrough(),
        _batches_of(rank, world, classes=classes),
        task="classification",
        loss_fn=task_loss("classification"),
        scores=scores,
    )


class _Passthrough(nn.Module):
    """A 'model' whose outputs are its inputs: the batches hold logits."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x


def _scored_on(rank: int, results) -> None:
    for classes in (2, 3):
        results[(rank, classes)] = _scored(rank, 2, classes)


def test_metrics_are_exact_over_all_ranks_and_agree_with_scikit_learn():
    from sklearn import metrics as sk

    two = on_ranks(_scored_on, 2)
    for classes in (2, 3):
        one = _scored(0, 1, classes)
        assert set(one) == {"val_loss", *(f"val_{m}" for m in METRICS)}
        assert two[(0, classes)] == two[(1, classes)]  # every rank reports the same
        assert two[(0, classes)] == pytest.approx(one, rel=1e-6)  # at any number of workers
        batch = _batches_of(0, 1, classes=classes)
        out = torch.cat([b["x"] for b in batch]).numpy()
        y = torch.cat([b["y"] for b in batch]).numpy()
        pred, probs = out.argmax(1), torch.tensor(out).softmax(1).numpy()
        average = "binary" if classes == 2 else "macro"
        expected = {
            "val_accuracy": sk.accuracy_score(y, pred),
            "val_f1": sk.f1_score(y, pred, average=average),
            "val_precision": sk.precision_score(y, pred, average=average),
            "val_recall": sk.recall_score(y, pred, average=average),
            "val_auroc": sk.roc_auc_score(y, probs[:, 1])
            if classes == 2
            else sk.roc_auc_score(y, probs, multi_class="ovr", average="macro"),
            "val_top2": 1.0
            if classes == 2
            else sk.top_k_accuracy_score(y, probs, k=2, labels=range(classes)),
        }
        for key, value in expected.items():
            assert one[key] == pytest.approx(value, abs=1e-5), key


def test_regression_metrics_are_in_the_targets_units():
    g = torch.Generator().manual_seed(1)
    pred, y = torch.randn(50, 1, generator=g), torch.randn(50, generator=g)
    scores = make_scores(["rmse", "mae", "r2"], "regression", None, target_std=3.0)
    scores.update(pred, y)
    got = scores.compute()
    err = (pred.squeeze(1) - y) * 3.0
    assert got["val_rmse"] == pytest.approx(err.square().mean().sqrt().item(), rel=1e-5)
    assert got["val_mae"] == pytest.approx(err.abs().mean().item(), rel=1e-5)
    r2 = 1 - (err / 3).square().sum() / (y - y.mean()).square().sum()
    assert got["val_r2"] == pytest.approx(r2.item(), rel=1e-5)
    with pytest.raises(SpecError, match="f1 is not a regression metric"):
        make_scores(["f1"], "regression", None)
    with pytest.raises(SpecError, match="rmse is a regression metric; this run is classification"):
        make_scores(["rmse"], "classification", 3)
    with pytest.raises(SpecError, match="train.metrics: expected accuracy, f1"):
        TrainSpec(metrics=["f2"])
    with pytest.raises(SpecError, match="train.monitor_mode: expected min or max"):
        TrainSpec(monitor="val_kappa")


def test_patience_counts_evaluations_without_an_improvement_and_resumes():
    history = [1.0, 0.8, 0.79, 0.85, 0.7, 0.75, 0.76]

    def run(progress: Progress, values, first: int = 1) -> int | None:
        for epoch, value in enumerate(values, first):
            progress.update(epoch, {progress.monitor: value})
            if progress.stop:
                return epoch
        return None

    # min_delta 0.05: 0.79 is no improvement on 0.8, but is the best value (its weights kept).
    p = Progress("val_loss", "min", patience=2, min_delta=0.05)
    assert run(p, history) == 4 and (p.best, p.best_epoch) == (0.79, 3)
    p = Progress("val_loss", "min", patience=2)
    assert run(p, history) == 7 and (p.best, p.best_epoch) == (0.7, 5)
    # Stopped at epoch 3 and resumed from its state: the same epoch as straight through.
    first = Progress("val_loss", "min", patience=2)
    run(first, history[:3])
    resumed = Progress("val_loss", "min", patience=2)
    resumed.resume(first.state())
    assert run(resumed, history[3:], first=4) == 7 and resumed.best_epoch == 5
    # max mode; NaN never improves.
    p = Progress("val_f1", "max", patience=1)
    assert run(p, [0.5, float("nan")]) == 2 and p.best == 0.5
