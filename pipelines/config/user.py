"""The seam for the user's own code: one spelling, `"module.path:attr"`, resolved by one helper.

A module is imported from the project directory (the directory trainyard is run from, which
`ray job submit --working-dir` ships to every node and Ray puts on every worker's path) or from
an installed package. Everything that can go wrong (no module, no attribute, the wrong kind of
object, an argument it does not take) is one `SpecError` naming the spec field, the module and
the attribute, raised on the driver before any worker starts.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainyard.cluster.errors import SpecError


def is_reference(name: str) -> bool:
    """Whether `name` names user code (`module:attr`) rather than a built-in."""
    return ":" in name


def project_on_path(directory: str | Path | None = None) -> Path:
    """Put the project directory (default: the current one) first on the import path, as
    `python -m` does and the `trainyard` command does not; return it."""
    project = Path(directory or os.getcwd()).resolve()
    if str(project) not in sys.path and "" not in sys.path[:1]:
        sys.path.insert(0, str(project))
    return project


def load(ref: str, field: str) -> Any:
    """The object `ref` ("module.path:attr", attr may be dotted) names, for spec field `field`."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise SpecError(f"{field}: expected module:attr (e.g. nets:WideNet), got {ref!r}")
    project = project_on_path()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise SpecError(
                f"{field}: cannot import {ref!r}: no module named {e.name!r} in the project "
                f"directory {project} or the installed packages"
            ) from None
        raise SpecError(f"{field}: importing {module_name!r} for {ref!r} failed: {e}") from None
    except Exception as e:
        raise SpecError(
            f"{field}: importing {module_name!r} for {ref!r} failed: {type(e).__name__}: {e}"
        ) from None
    origin = Path(getattr(module, "__file__", "") or "").resolve()
    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = (
                f"module {module_name!r} ({origin})"
                if i == 0
                else repr(f"{module_name}:{'.'.join(attr.split('.')[:i])}")
            )
            raise SpecError(f"{field}: {where} has no attribute {part!r}{hint}") from None
        obj = getattr(obj, part)
    return obj


def load_callable(ref: str, field: str) -> Callable[..., Any]:
    """`load`, checking that what it names can be called."""
    fn = load(ref, field)
    if not callable(fn):
        raise SpecError(f"{field}: {ref!r} is a {type(fn).__name__}, not a function or class")
    return fn


def check_arguments(
    fn: Callable[..., Any],
    args: dict[str, Any],
    field: str,
    ref: str,
    args_field: str | None = None,
) -> None:
    """Refuse an argument in `args` that `fn` does not take (SpecError)."""
    arguments(fn, {}, args, field, ref, complete=False, args_field=args_field)


def arguments(
    fn: Callable[..., Any],
    facts: dict[str, Any],
    args: dict[str, Any],
    field: str,
    ref: str,
    complete: bool = True,
    args_field: str | None = None,
) -> dict[str, Any]:
    """The keyword arguments to call `fn` with: each of `facts` whose name it takes (what the
    pipeline knows: in_features, num_classes, vocab_size, ...), then `args` (the spec's,
    `args_field`: `<field>.args` unless named), which override them and must all be taken;
    with `complete`, every parameter without a default must then have a value."""
    args_field = args_field or f"{field}.args"
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: pass what was asked for
        return dict(args)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    unknown = [k for k in args if k not in named and not takes_any]
    if unknown:
        raise SpecError(
            f"{args_field}: {ref} takes no argument {unknown[0]!r}; it takes: "
            + (", ".join(sorted(named)) or "none")
        )
    kwargs = {k: v for k, v in facts.items() if k in named} | dict(args)
    missing = [
        n
        for n, p in params.items()
        if n in named and p.default is inspect.Parameter.empty and n not in kwargs
    ]
    if missing and complete:
        known = ", ".join(sorted(facts)) or "none"
        raise SpecError(
            f"{args_field}: {ref} needs {', '.join(repr(m) for m in missing)}, which the "
            f"pipeline does not know (it knows: {known}); give it in {args_field}"
        )
    return kwargs


def call(fn: Callable[..., Any], kwargs: dict[str, Any], field: str, ref: str, what: str) -> Any:
    """`fn(**kwargs)`; an exception from the user's code is one SpecError naming the call."""
    try:
        return fn(**kwargs)
    except Exception as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise SpecError(
            f"{field}: building {what} {ref}({shown}) failed: {type(e).__name__}: {e}"
        ) from None


def source_paths(refs: list[str]) -> list[str]:
    """The files or package directories of the user modules `refs` name (imported already),
    to log with a model so that it loads in a fresh process elsewhere; trainyard's own and
    installed packages are left out."""
    paths: list[str] = []
    for ref in refs:
        top = ref.partition(":")[0].split(".")[0]
        module = sys.modules.get(top)
        file = getattr(module, "__file__", None)
        if not file:
            continue
        path = Path(file).resolve()
        path = path.parent if path.name == "__init__.py" else path
        if "site-packages" in path.parts or top == "trainyard":
            continue
        if str(path) not in paths:
            paths.append(str(path))
    return paths


def resolve_model(name: str) -> Callable[..., Any]:
    """The builder a model name stands for: a built-in's (trainyard.models.MODELS) or the user's."""
    from trainyard.models import MODELS  # noqa: PLC0415 (torch: not on the command's start)

    if name in MODELS:
        return MODELS[name]
    return load_callable(name, "model.name")


@dataclass(frozen=True)
class ModelRecipe:
    """What builds the model: the driver makes it (model_recipe), the workers and every later
    load build from it (build_model), and checkpoints keep it as plain data (`asdict`, read
    back with `of`)."""

    name: str
    """A built-in model's name (trainyard.models.MODELS) or the user's module:attr."""
    kwargs: dict[str, Any]
    """What it is called with: the data's facts it takes and the spec's arguments."""

    @classmethod
    def of(cls, value: ModelRecipe | dict[str, Any]) -> ModelRecipe:
        """A recipe, from itself or from its plain form (a checkpoint's)."""
        return value if isinstance(value, ModelRecipe) else cls(value["name"], value["kwargs"])

    def describe(self) -> str:
        """`name(key=value, ...)`."""
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.kwargs.items())})"


def model_recipe(model_spec: Any, facts: dict[str, Any]) -> ModelRecipe:
    """What builds the model the spec names on data with these facts."""
    name = model_spec.name
    fn = resolve_model(name)
    return ModelRecipe(name, arguments(fn, facts, model_spec.args_for(facts), "model", name))


def build_model(recipe: ModelRecipe | dict[str, Any]) -> Any:
    """The nn.Module a recipe describes."""
    from torch import nn

    recipe = ModelRecipe.of(recipe)
    name = recipe.name
    model = call(resolve_model(name), recipe.kwargs, "model.name", name, "the model")
    if not isinstance(model, nn.Module):
        raise SpecError(
            f"model.name: {name} returned a {type(model).__name__}, not a torch nn.Module"
        )
    return model
