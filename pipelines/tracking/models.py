"""MLflow's side of a trained model: log it (signature, example, code, signature file),
register it, and fetch it back checked (cluster.signing)."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from trainyard.cluster import signing
from trainyard.cluster.errors import TrainyardError
from trainyard.pipelines.tracking.runs import mlflow_client


def link_model(uri: str, run_id: str, model_uri: str) -> None:
    """Show a model another run logged (models:/m-...) among this run's models, too."""
    from mlflow.entities import LoggedModelOutput

    model_id = model_uri.removeprefix("models:/")
    mlflow_client(uri).log_outputs(run_id, [LoggedModelOutput(model_id, 0)])


class _DropPickleNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(
            ("Saving pytorch model by Pickle", "Passing a Python object as `python_model`")
        )


@contextlib.contextmanager
def _quiet_model_logging():
    """Two notices MLflow prints for every model trainyard logs, and nothing else: that pickle
    runs code when loaded (the model is pickled on purpose, to take raw rows: see log_model),
    and torch's warning that the input example's array is read-only (pandas 3 hands out
    read-only arrays; MLflow only reads it to check the signature)."""
    notice = _DropPickleNotice()
    loggers = [logging.getLogger(name) for name in ("mlflow.pytorch", "mlflow.pyfunc")]
    for logger in loggers:
        logger.addFilter(notice)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(notice)


@contextlib.contextmanager
def fluent(uri: str):
    """MLflow's fluent API, and its downloads of `models:/` URIs, use the process-wide tracking
    URI (which MLflow also exports to the environment): `uri` inside, what was there after."""
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def trainyard_code(directory: str | Path) -> str:
    """A copy of the trainyard packages a logged model needs, as the folder `trainyard` in
    `directory` (its path, for code_paths): a fresh process imports it as trainyard.* from the
    model's code, whatever trainyard it has installed, or none."""
    root = Path(directory) / "trainyard"
    for name in ("cluster", "models", "pipelines"):
        source = Path(importlib.import_module(f"trainyard.{name}").__file__).parent
        shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__", "bench"))
    return str(root)


def log_model(
    uri: str,
    run_id: str,
    model: Any,
    example: Any,
    metadata: dict[str, str] | None = None,
    code_paths: list[str] = (),
) -> str:
    """Log a model (one of trainyard.pipelines.data.serving's) with its signature, input
    example (a DataFrame of raw rows or an array of inputs) and metadata; return its model URI.
    Its code is trainyard's packages (as `trainyard/`) and `code_paths`, the user's modules it
    needs, so that it loads in a fresh process anywhere.

    Call it last: leaving `mlflow.start_run(run_id)` marks the run FINISHED, and `end_run`
    then sets the final status.
    """
    import mlflow
    import mlflow.pyfunc
    import torch
    from mlflow.models import ModelSignature, infer_signature

    # Named up front: inferring them loads the model again in a subprocess (slow).
    requirements = [f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas"]
    requirements += getattr(model, "requirements", [])
    # The inputs as the model declares them (what users' tables hold: data.serving), the outputs
    # as it gives them for the example.
    with warnings.catch_warnings():
        # (MLflow's hint that integer columns cannot hold missing values is about inputs at
        # inference time; these are the model's outputs, a text's byte and token counts)
        warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer", UserWarning)
        outputs = infer_signature(model_output=model.predict(None, example)).outputs
    signature = ModelSignature(inputs=model.input_schema(example), outputs=outputs)
    with (
        tempfile.TemporaryDirectory() as scratch,
        fluent(uri),
        mlflow.start_run(run_id=run_id),
        _quiet_model_logging(),
    ):
        code = [trainyard_code(scratch), *code_paths]
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=model,
            code_paths=code,
            signature=signature,
            input_example=example,
            pip_requirements=requirements,
            metadata=metadata,
        )
    sign_model(info.model_uri, info.model_id, uri)
    return info.model_uri


def register_model(uri: str, model_uri: str, name: str, alias: str | None = None) -> str:
    """Register the model at `model_uri` as a new version of `name` (and point `alias` at it);
    return the version's URI, models:/NAME/VERSION."""
    import mlflow
    from mlflow import MlflowClient

    try:
        with fluent(uri):
            version = mlflow.register_model(model_uri, name).version
        if alias:
            MlflowClient(uri).set_registered_model_alias(name, alias, version)
    except mlflow.exceptions.MlflowException as e:
        raise TrainyardError(f"tracking.register_as: {name!r}: {e.message}") from None
    return f"models:/{name}/{version}"


def sign_model(model_uri: str, model_id: str, uri: str) -> None:
    """Sign the files of the logged model as the store holds them (cluster.signing)."""
    import mlflow.artifacts
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as d:
        with fluent(uri):
            local = mlflow.artifacts.download_artifacts(model_uri, dst_path=d)
        MlflowClient(uri).log_model_artifact(model_id, str(signing.sign(local)))


def add_model_arguments(parser: Any, metavar: str, help: str) -> None:
    """A logged model to load, --trust-model and --tracking-uri: what `generate` and `predict`
    take."""
    parser.add_argument("model", metavar=metavar, help=help)
    parser.add_argument(
        "--trust-model",
        action="store_true",
        help="load a model trainyard did not sign (loading runs the code pickled in it)",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )


def model_uri(value: str) -> str:
    """A model URI or a model's directory as given, or the model logged in the run with id
    `value`."""
    return value if ":/" in value or Path(value).is_dir() else f"runs:/{value}/model"


def fetch_model(model_uri: str, uri: str, into: str | Path, trust: bool = False) -> Path:
    """Download the model at `model_uri` (any MLflow model URI, or a local directory) into
    `into` and return its directory, checked to be a model trainyard signed with this key
    before anything in it is unpickled; `trust` loads an unsigned one."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        with fluent(uri):
            local = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(into))
    except (MlflowException, OSError) as e:
        message = getattr(e, "message", e)
        raise TrainyardError(f"cannot load {model_uri} from {uri}: {message}") from None
    if not trust:
        try:
            signing.verify(local)
        except signing.UntrustedModel as e:
            raise TrainyardError(
                f"{model_uri}: refused to load: {e}. Loading a model runs the code pickled in it; "
                "if you trust whoever wrote it, pass --trust-model"
            ) from None
    return Path(local)
