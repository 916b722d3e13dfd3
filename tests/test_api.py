"""The Python API (`import trainyard`) without a cluster: specs from files, dicts and RunSpecs
with typed overrides, mistakes as exceptions (never an exit), and an import that costs a Ray
worker nothing. A whole run from Python: test_train_e2e's digits run and its prediction."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import trainyard

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "configs" / "digits.yaml"


def test_a_spec_loads_from_a_file_a_dict_or_a_spec_with_overrides_as_values_or_strings():
    spec = trainyard.load_spec(DIGITS, {"train.epochs": 3, "train.metrics": ["accuracy", "f1"]})
    assert spec.train.epochs == 3 and spec.train.metrics == ["accuracy", "f1"]
    assert trainyard.load_spec(DIGITS, ["train.epochs=3", "train.metrics=[accuracy, f1]"]) == spec
    again = trainyard.load_spec(spec, {"train.lr": 0.01})
    assert again.train.lr == 0.01 and again.train.epochs == 3 and spec.train.lr != 0.01
    raw = spec.to_dict()
    assert trainyard.load_spec(raw, {"train.epochs": 5}).train.epochs == 5
    assert raw["train"]["epochs"] == 3  # (the caller's dict is left as it was)


def test_mistakes_are_exceptions_that_name_what_is_wrong(tmp_path):
    with pytest.raises(trainyard.SpecError, match="train.epochs"):
        trainyard.train(DIGITS, overrides={"train.epochs": "many"})
    with pytest.raises(trainyard.SpecError, match="overrides"):
        trainyard.load_spec(DIGITS, "train.epochs=3")  # (a string is not a list of them)
    with pytest.raises(trainyard.SpecError, match="config file not found"):
        trainyard.train(tmp_path / "missing.yaml")
    with pytest.raises(trainyard.TrainyardError, match="predict: no option 'batch'"):
        trainyard.predict("runs:/x/model", tmp_path, tmp_path / "out", batch=3)
    assert not issubclass(trainyard.RunFailed, trainyard.TrainyardError)  # (exit 1, not 2)


def test_importing_any_part_of_trainyard_does_not_import_the_api():
    """Every Ray worker imports trainyard.pipelines.training...: the top-level package it
    passes through loads the API (and what it imports) only when a name of it is used."""
    code = (
        "import sys, trainyard.cluster.errors; "
        "print(sorted(m for m in sys.modules if m.startswith('trainyard')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['trainyard', 'trainyard.cluster', 'trainyard.cluster.errors']"


def test_the_command_starts_without_torch_ray_or_mlflow():
    """Its command table built (every command's module imported), the command has imported
    none of torch, Ray or MLflow: `trainyard train` prepares its data while they load in the
    background, `k8s` and `submit` never need them (pyproject's ruff rules keep them inside
    the functions that use them; this checks what the modules pull in through each other)."""
    code = (
        "import sys; from trainyard.pipelines import cli; cli._parser(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'mlflow'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
