"""The run spec: one small dataclass per part, composed into `RunSpec`, loaded from YAML.

Defaults live here and nowhere else. Every field validates itself and a bad value raises
`SpecError` naming the field, so a user mistake is one clear line before any worker starts.
The spec crosses the Ray boundary as a plain dict (`RunSpec.to_dict` / `RunSpec.from_dict`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from trainyard.cluster.errors import SpecError
from trainyard.cluster.errors import check as _check
from trainyard.cluster.resources import ScalingSpec
from trainyard.cluster.secrets import redact
from trainyard.pipelines.config.data import CacheSpec
from trainyard.pipelines.config.model import GPTSpec, MLPSpec, ResNetSpec, UserModelSpec
from trainyard.pipelines.config.search import TuneSpec
from trainyard.pipelines.config.tracking import TrackingSpec
from trainyard.pipelines.config.train import AmpSpec, TrainSpec

PIPELINES: dict[str, str] = {
    "tabular": "trainyard.pipelines.data.tabular",
    "text": "trainyard.pipelines.data.text",
    "custom": "trainyard.pipelines.data.custom",
    "images": "trainyard.pipelines.data.images",
}
"""The pipelines, each a package (data/<pipeline>/: its spec part, preparation, logged model and
batch prediction), registered here by name: a new pipeline is its package and one line."""


def pipeline_part(name: str) -> types.ModuleType:
    """The pipeline's spec module (`<package>.spec`): `DATA`, its data part's dataclass;
    `MODEL`, the model spec it trains by default; optionally `check_run(spec)`, what its data
    part needs of the rest of the spec. (Imported by name: the packages sit above this layer,
    their spec modules import only config.)"""
    _check(name in PIPELINES, "pipeline", name, "one of " + ", ".join(PIPELINES))
    return importlib.import_module(f"{PIPELINES[name]}.spec")


def _default_data() -> Any:
    return pipeline_part("tabular").DATA()


@dataclass
class RunSpec:
    pipeline: str = "tabular"
    """`tabular`: CSV/Parquet rows → MLP. `text`: text files → byte-level GPT. `custom`: your
    own dataset (data.dataset). `images`: class folders of images → ResNet. Any pipeline
    trains your own model (model.name: module:attr)."""
    data: Any = field(default_factory=_default_data)
    """The pipeline's data part (`<pipeline package>.spec.DATA`)."""
    model: MLPSpec | GPTSpec | ResNetSpec | UserModelSpec = field(default_factory=MLPSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    amp: AmpSpec = field(default_factory=AmpSpec)
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    tune: TuneSpec = field(default_factory=TuneSpec)
    cache: CacheSpec = field(default_factory=CacheSpec)

    def __post_init__(self) -> None:
        part = pipeline_part(self.pipeline)
        model_cls = part.MODEL
        _check(
            isinstance(self.data, part.DATA), "data", self.data, f"the {self.pipeline} data part"
        )
        _check(
            isinstance(self.model, model_cls | UserModelSpec),
            "model.name",
            self.model.name,
            f"{model_cls().name or 'module:attr'} or module:attr for the {self.pipeline} pipeline",
        )
        if hasattr(part, "check_run"):
            part.check_run(self)
        for key in ("in_memory_max_mb", "shuffle_window_mb"):
            mb = getattr(self.data, key)
            _check(
                isinstance(mb, int | float) and not isinstance(mb, bool) and mb >= 0,
                f"data.{key}",
                mb,
                "a number of MB >= 0",
            )
        tr, sc = self.train, self.scaling
        if tr.tokens_per_step is not None:
            _check(
                self.context is not None and tr.tokens_per_step % self.context == 0,
                "train.tokens_per_step",
                tr.tokens_per_step,
                f"a multiple of the context length ({self.context})"
                if self.context
                else "unset outside the text pipeline",
            )
        per_worker, key = (
            (tr.micro_batch_size, "train.micro_batch_size")
            if tr.micro_batch_size is not None
            else (tr.grad_accum_steps, "train.grad_accum_steps")
        )
        name = "train.tokens_per_step" if tr.tokens_per_step else "train.batch_size"
        value = tr.tokens_per_step or tr.batch_size
        # (an elastic run may train on any number of workers from min to max)
        for workers in range(sc.min_workers, sc.max_workers + 1):
            per_step = workers * per_worker
            _check(
                self.global_batch % per_step == 0,
                name,
                value,
                f"a global batch ({self.global_batch} samples) that is a multiple of "
                f"{workers} worker(s) × {key} = {per_step}"
                + (
                    f" (elastic: every size from {sc.min_workers} to {sc.max_workers})"
                    if sc.elastic
                    else ""
                ),
            )

    @property
    def context(self) -> int | None:
        """Tokens per sample (text), None for tabular rows."""
        if isinstance(self.model, GPTSpec):
            return self.model.config(vocab_size=256).context
        if isinstance(self.model, UserModelSpec) and self.pipeline == "text":
            return self.model.args.get("context")
        return None

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all workers and accumulation steps."""
        if self.train.tokens_per_step is not None:
            return self.train.tokens_per_step // self.context
        return self.train.batch_size

    @property
    def accum_steps(self) -> int:
        """Micro-batches per optimizer step on each worker."""
        if self.train.micro_batch_size is not None:
            return self.global_batch // (self.scaling.max_workers * self.train.micro_batch_size)
        return self.train.grad_accum_steps

    @property
    def micro_batch_size(self) -> int:
        """Samples one worker feeds through the model per forward pass."""
        return self.global_batch // (self.scaling.max_workers * self.accum_steps)

    @property
    def eval_batch_size(self) -> int:
        """Samples one worker feeds through the model per validation forward pass."""
        return self.train.eval_batch_size or self.micro_batch_size

    def at_world(self, world: int) -> RunSpec:
        """This spec as trained on `world` workers (an elastic run's size of the moment): the
        same global batch, its micro-batches and accumulation split over `world`."""
        if self.scaling.num_workers == world:
            return self
        scaling = dataclasses.replace(self.scaling, num_workers=world)
        return dataclasses.replace(self, scaling=scaling)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunSpec:
        if not isinstance(raw, dict):
            raise SpecError(f"the spec: expected a mapping, got {raw!r}")
        pipeline = raw.get("pipeline", "tabular")
        _check(isinstance(pipeline, str), "pipeline", pipeline, "one of " + ", ".join(PIPELINES))
        part = pipeline_part(pipeline)
        data_cls, model_cls = part.DATA, part.MODEL
        model = raw.get("model") or {}
        # (by the field's default: a GPTSpec checks its size against the model's table, and
        # that imports torch, which a tabular run's driver does not need yet)
        names = {c.__dataclass_fields__["name"].default: c for c in (MLPSpec, GPTSpec, ResNetSpec)}
        default = model_cls.__dataclass_fields__["name"].default
        name = model.get("name", default) if isinstance(model, dict) else None
        if name in names:
            model_cls = names[name]
        elif isinstance(name, str) and ":" in name:
            model_cls = UserModelSpec
        elif isinstance(model, dict):
            _check(False, "model.name", name, "one of " + ", ".join(names) + ", or module:attr")
        return _build(cls, raw, prefix="", types={"data": data_cls, "model": model_cls})

    def to_yaml(self) -> str:
        """The spec as YAML, to show or record: credentials masked (trainyard.cluster.secrets)."""
        return yaml.safe_dump(redact(self.to_dict()), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """The spec as `section.key: value` pairs (MLflow params), credentials masked; the
        search (`tune`) is not the run's: a search records it on its parent run."""
        out: dict[str, Any] = {}
        for section, values in redact(self.to_dict()).items():
            if section == "tune":
                continue
            if isinstance(values, dict):
                out.update({f"{section}.{k}": v for k, v in values.items()})
            else:
                out[section] = values
        return out


Overrides = Mapping[str, Any] | Iterable[str] | None
"""`{"train.epochs": 3}` (values as they are), or the command's `["train.epochs=3"]` (`--set`:
values parsed as YAML)."""


def load_spec(
    spec: str | Path | Mapping[str, Any] | RunSpec, overrides: Overrides = None
) -> RunSpec:
    """The validated run spec from a YAML file, a dict of sections or a RunSpec, with
    `overrides` applied (SpecError naming the field where one is wrong)."""
    if isinstance(spec, RunSpec):
        raw = spec.to_dict()
    elif isinstance(spec, Mapping):
        raw = copy.deepcopy(dict(spec))
    else:
        raw = read_yaml(Path(spec))
    if isinstance(overrides, str):
        raise SpecError(f"overrides: expected a dict or a list of key=value, got {overrides!r}")
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            set_dotted(raw, str(key), value, f"overrides[{key!r}]")
    else:
        for item in overrides or ():
            apply_override(raw, item)
    return RunSpec.from_dict(raw)


def read_yaml(path: Path) -> dict[str, Any]:
    """A run spec file's sections (SpecError where it is missing or not a YAML mapping)."""
    if not path.is_file():
        raise SpecError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpecError(
            f"{path}: not valid YAML ({e.problem} at line {e.problem_mark.line + 1})"
            if getattr(e, "problem_mark", None)
            else f"{path}: not valid YAML"
        ) from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `section.key=value` in a raw spec dict; the value is parsed as YAML
    (`2`, `[64]`, `null`)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise SpecError(f"--set {item!r}: expected section.key=value")
    set_dotted(raw, key, yaml.safe_load(text) if text else "", f"--set {item!r}")


def set_dotted(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    """raw[a][b][c] = value for key `a.b.c`, making the sections that are missing."""
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError(f"{where}: {part!r} is not a section")
    node[leaf] = value


# --- typed construction from plain data -------------------------------------------------------


def _build(cls: type, raw: Any, prefix: str, types: dict[str, type] | None = None) -> Any:
    where = prefix.rstrip(".") or "the spec"
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls) | (types or {})
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise SpecError(f"unknown key {prefix}{key}{hint}; valid keys: {', '.join(names)}")
    kwargs = {key: _coerce(f"{prefix}{key}", value, hints[key]) for key, value in raw.items()}
    for key, tp in (types or {}).items():
        if key not in kwargs:
            kwargs[key] = tp()
    return cls(**kwargs)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, prefix=f"{name}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # `int | list[int]`: the list when a list is given
            listed = [a for a in inner if typing.get_origin(a) is list]
            inner = (
                listed
                if isinstance(value, list) and listed
                else [a for a in inner if a not in listed]
            )
        return _coerce(name, value, inner[0])
    if origin is Literal:
        _check(value in args, name, value, "one of " + ", ".join(map(str, args)))
        return value
    if tp is Any:
        return value
    if origin is dict:
        _check(isinstance(value, dict), name, value, "a mapping")
        return {str(k): _coerce(f"{name}.{k}", v, args[1]) for k, v in value.items()}
    if origin is list:
        _check(isinstance(value, list), name, value, f"a list of {args[0].__name__}")
        return [_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(
            isinstance(value, (int, float)) and not isinstance(value, bool), name, value, "a number"
        )
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), name, value, "an integer")
        return value
    if tp is bool:
        _check(isinstance(value, bool), name, value, "true or false")
        return value
    if tp is str:
        _check(isinstance(value, str), name, value, "a string")
        return value
    raise TypeError(f"{name}: unsupported annotation {tp}")
