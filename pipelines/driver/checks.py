"""What the driver checks before any worker starts: the user code the spec names (imported,
its arguments taken), and the model built once from the prepared data's facts, with its
optimizer, schedule, metrics and monitor, run forward on two training rows through the loss.
Each problem is one SpecError line."""

from __future__ import annotations

from typing import Any

from trainyard.cluster.errors import SpecError
from trainyard.pipelines.config import user
from trainyard.pipelines.config.model import UserModelSpec
from trainyard.pipelines.config.spec import RunSpec
from trainyard.pipelines.config.user import ModelRecipe
from trainyard.pipelines.data.common import Prepared


def check_code(spec: RunSpec) -> None:
    """Import every piece of user code the spec names (SpecError, one line, for each problem):
    models, datasets, losses, optimizer and scheduler classes (and the arguments given them)."""
    from trainyard.pipelines.training.optim import optimizer_class, scheduler_class  # noqa: PLC0415 (torch: not on the command's start)

    if ":" in spec.train.optimizer:  # (the built-ins need no check, nor torch imported yet)
        optimizer_class(spec.train)
    if ":" in spec.train.schedule:
        scheduler_class(spec.train)
    for key, ref in user_references(spec).items():
        if key == "model.name":
            fn = user.resolve_model(ref)
            user.check_arguments(fn, spec.model.args, "model", ref)
        elif key == "data.dataset":
            fn = user.load_callable(ref, key)
            user.check_arguments(fn, spec.data.args, "data", ref)
        elif not key.startswith(("train.optimizer", "train.schedule")):  # (checked above)
            user.load_callable(ref, "train.metrics" if key.startswith("train.metrics") else key)


def user_references(spec: RunSpec) -> dict[str, str]:
    """The spec's module:attr references, by field."""
    refs = {
        "model.name": spec.model.name,
        "train.loss": spec.train.loss,
        "train.optimizer": spec.train.optimizer,
        "train.schedule": spec.train.schedule,
        **{f"train.metrics[{i}]": m for i, m in enumerate(spec.train.metrics or [])},
        "data.dataset": getattr(spec.data, "dataset", None),
        "data.preprocess": getattr(spec.data, "preprocess", None),
        "data.augment": getattr(spec.data, "augment", None),  # (or a built-in's dict)
        "data.tokenizer": getattr(spec.data, "tokenizer", None),
    }
    return {k: v for k, v in refs.items() if isinstance(v, str) and ":" in v}


def checked_model(spec: RunSpec, data: Prepared) -> tuple[ModelRecipe, str]:
    """Build the model once here, from the pipeline's facts and the spec, with its optimizer,
    schedule and validation metrics, and run it forward on two training rows through the
    training loss: a model that cannot be built, an optimizer or scheduler that does not take
    its arguments, a metric or monitor the run cannot log, or a model whose output the loss
    does not take (or that returns no loss of its own) is one line before any worker starts.
    Returns its recipe, and a line that says what it is and its size."""
    import torch

    from trainyard.pipelines.training.optim import make_optimizer, make_scheduler  # noqa: PLC0415 (torch: not on the command's start)
    from trainyard.pipelines.training.scores import make_scores  # noqa: PLC0415 (torch: not on the command's start)
    from trainyard.pipelines.training.step import forward_loss, own_loss, training_loss  # noqa: PLC0415 (torch: not on the command's start)

    recipe = user.model_recipe(spec.model, data.facts)
    net = user.build_model(recipe)
    line = describe_model(spec, recipe, net)
    tr, task = spec.train, data.data_facts.task
    make_scheduler(make_optimizer(net, tr), tr, 100 * tr.epochs, tr.epochs)
    classes = data.facts.get("num_classes") or data.facts.get("vocab_size")
    scores = make_scores(tr.metrics, task, classes, data.data_facts.target_std)
    check_monitor(spec, task)
    own = own_loss(spec, net)
    if isinstance(spec.model, UserModelSpec) or tr.loss:
        batch = data.train.take_batch(2, batch_format="numpy")
        dtypes = data.data_facts.dtypes
        x, y = (
            torch.tensor(batch[k]).to(getattr(torch, dtypes[k]) if k in dtypes else None)
            for k in ("x", "y")
        )
        loss_fn = training_loss(task, tr, own)
        try:
            with torch.no_grad():
                loss, out = forward_loss(net.eval(), x, y, loss_fn)
            if loss.dim() != 0:
                raise ValueError(f"the loss is a tensor of shape {tuple(loss.shape)}, not a scalar")
        except Exception as e:
            what = f"{recipe.name} and " + (
                "its own loss" if own else tr.loss or f"the {task} loss"
            )
            raise SpecError(
                f"model: {what} fail on two training rows (x {_shape(x)}, y {_shape(y)}): "
                f"{type(e).__name__}: {e}"
            ) from None
        try:
            scores.update(out.float(), y)
        except Exception as e:
            raise SpecError(
                f"train.metrics: {tr.metrics or 'the defaults'} cannot score {recipe.name}'s "
                f"outputs {_shape(out)} against y {_shape(y)}: {type(e).__name__}: {e}"
            ) from None
    return recipe, line


def check_monitor(spec: RunSpec, task: str | None) -> None:
    """train.monitor must be a metric the run logs (SpecError naming those it does)."""
    from trainyard.pipelines.training.scores import logged_names  # noqa: PLC0415 (torch: not on the command's start)

    logged = ["train_loss", *logged_names(spec.train.metrics, task)]
    if spec.pipeline == "text":
        logged += ["val_bits_per_byte", "val_loss_vs_unigram"]
    if spec.train.monitor not in logged:
        raise SpecError(
            f"train.monitor: this run never logs {spec.train.monitor!r}; it logs "
            f"{', '.join(logged)} (add the metric to train.metrics)"
        )


def describe_model(spec: RunSpec, recipe: ModelRecipe, net: Any) -> str:
    """Print the model's size and what each worker holds of it; return the first."""
    params = sum(p.numel() for p in net.parameters())
    line = f"{recipe.describe()}: {params / 1e6:.3g}M parameters"
    print(f"trainyard: model {line}")
    print(held_per_worker(spec, net, params))
    return line


def held_per_worker(spec: RunSpec, net: Any, params: int) -> str:
    """One line: what each worker holds under the spec's strategy, and the blocks FSDP shards
    one at a time (scaling.blocks naming no module of the model is a SpecError here)."""
    from trainyard.pipelines.training import parallel  # noqa: PLC0415 (torch: not on the command's start)

    sc = spec.scaling
    blocks = parallel.block_names(net, sc.blocks)
    found = len(parallel.blocks_of(net, blocks))
    # (an elastic run's workers hold the most when there are fewest of them)
    held = parallel.per_rank_bytes(params, sc.strategy, sc.min_workers, spec.train.optimizer)
    line = f"trainyard: each worker holds {parallel.describe_bytes(held)} ({sc.strategy}"
    if sc.strategy == "fsdp":
        unit = f"{found} × {'/'.join(blocks)}" if found else "the whole model as one unit"
        fewest = ", the fewest of this elastic run" if sc.elastic else ""
        line += f" over {sc.min_workers} worker(s){fewest}, sharding {unit}"
        line += ", in CPU memory" if sc.cpu_offload else ""
    return line + ")"


def _shape(t: Any) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
