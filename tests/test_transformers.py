"""Hugging Face `transformers` models as they come (examples/hf): a
`ResNetForImageClassification` on the images pipeline and a `GPT2LMHeadModel` on the text
pipeline, each built from its config by a factory the spec names (nothing downloaded), with
no wrapper module. Each trains through `trainyard train` as a user runs it from the project
directory, on the local multi-node cluster; each logged model predicts in a fresh process
elsewhere; `trainyard predict` and `trainyard generate` sample the GPT-2.

transformers is in the dev extra, so CI runs this; where it is not installed, it is skipped.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="transformers is not installed (the dev extra has it)")

from conftest import pyfunc_elsewhere, train_in_project  # noqa: E402
from shared_runs import SMALL_CORPUS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "hf"


def train(project: Path, ray_cluster, tracking_uri: str, config: str, *sets: str) -> dict:
    """`trainyard train CONFIG` from the project directory with `--set` SETS, in a process of
    its own."""
    sets = (f"scaling.storage_path={project / 'results'}", *sets)
    args = [a for s in sets for a in ("--set", s)]
    return train_in_project(project, ray_cluster, tracking_uri, config, *args)


def test_transformers_models_train_log_predict_and_generate_without_wrappers(
    ray_cluster, tracking_uri, tmp_path, capsys, monkeypatch
):
    import numpy as np

    from trainyard.pipelines import cli
    from trainyard.pipelines.data.images.files import digits_images

    project = tmp_path / "hf"
    shutil.copytree(EXAMPLE, project)
    resnet = train(project, ray_cluster, tracking_uri, "configs/resnet.yaml", "train.epochs=2")
    assert resnet["metrics"]["val_accuracy"] > 0.5  # ten classes: learning, not chance
    # The logged model in a fresh process elsewhere: the classes of PNG files, by name.
    pngs = sorted(digits_images().glob("*/*.png"))[::97]
    read = f"pd.DataFrame({{'path': {[str(p) for p in pngs]!r}}})"
    names = pyfunc_elsewhere(tracking_uri, resnet["model_uri"], read, tmp_path / "elsewhere-1")
    assert len(names) == len(pngs) and set(names) <= {str(c) for c in range(10)}
    assert np.mean([n == p.parent.name for n, p in zip(names, pngs, strict=True)]) > 0.5

    gpt2 = train(
        project, ray_cluster, tracking_uri, "configs/gpt2.yaml",
        f"data.path={SMALL_CORPUS}", "data.validation_windows=32", "model.args.context=32",
        "train.epochs=2", "train.steps_per_epoch=8", "train.batch_size=16",
    )  # fmt: skip
    assert gpt2["metrics"]["val_loss"] < np.log(256)  # better than knowing nothing
    # Scored in a fresh process elsewhere: the texts' loss per token.
    read = "pd.DataFrame({'text': ['def main():\\n    return 0\\n', 'import os\\n']})"
    scored = pyfunc_elsewhere(tracking_uri, gpt2["model_uri"], read, tmp_path / "elsewhere-2")
    assert all(0 < loss < 10 for loss in scored["loss"])
    # trainyard samples it itself (it has no `generate` of trainyard's GPT), the same bytes
    # from `generate` and from `predict --generate`.
    monkeypatch.chdir(project)
    assert cli.main(["generate", gpt2["model_uri"], "--prompt", "def ", "--max-bytes", "16"]) == 0
    generated = capsys.readouterr().out
    texts = project / "texts.csv"
    texts.write_text('text\n"def "\n')
    out = tmp_path / "continued"
    sampling = ["--generate", "16", "--temperature", "0.8", "--seed", "0"]
    assert cli.main(["predict", gpt2["model_uri"], str(texts), "--out", str(out), *sampling]) == 0
    import pandas as pd

    continued = pd.read_parquet(out)["continuation"].tolist()
    assert len(continued) == 1 and f"def {continued[0]}\n" in generated
