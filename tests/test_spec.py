from pathlib import Path

import pytest

from trainyard.cluster.errors import SpecError
from trainyard.pipelines.config.spec import RunSpec, apply_override, load_spec

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_every_config_parses():
    assert CONFIGS
    for path in CONFIGS:
        assert isinstance(load_spec(path), RunSpec)


def test_defaults_and_roundtrip():
    spec = RunSpec.from_dict({"data": {"path": "x.csv", "label": "y"}})
    assert spec.train.epochs == 30 and spec.amp.mode == "auto" and spec.scaling.num_workers == 2
    assert RunSpec.from_dict(spec.to_dict()) == spec
    assert spec.flat()["train.lr"] == 1e-3
    elastic = load_spec_from(spec, "scaling.num_workers=[1, 3]", "train.batch_size=24")
    assert RunSpec.from_dict(elastic.to_dict()) == elastic and elastic.scaling.elastic
    # the same global batch at every size it may train on: micro-batches follow the size
    assert [elastic.at_world(n).micro_batch_size for n in (1, 2, 3)] == [24, 12, 8]


def load_spec_from(spec: RunSpec, *overrides: str) -> RunSpec:
    raw = spec.to_dict()
    for item in overrides:
        apply_override(raw, item)
    return RunSpec.from_dict(raw)


def test_unknown_key_names_the_closest(tmp_path):
    with pytest.raises(SpecError, match=r"unknown key data\.lable \(did you mean data\.label\?\)"):
        load_spec(write(tmp_path, "data: {path: x.csv, lable: y}\n"))
    with pytest.raises(SpecError, match=r"unknown key trian \(did you mean train\?\)"):
        load_spec(write(tmp_path, "data: {path: x.csv}\ntrian: {epochs: 1}\n"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {epochs: two}", r"train\.epochs: expected an integer, got 'two'"),
        ("train: {epochs: 0}", r"train\.epochs: expected an integer >= 1, got 0"),
        ("train: {lr: -1}", r"train\.lr: expected a positive number"),
        ("amp: {mode: fp8}", r"amp\.mode: expected one of auto, bf16, fp16, off"),
        ("model: {hidden: [64, -1]}", r"model\.hidden"),
        ("model: {name: vit}", r"model\.name: expected one of mlp, gpt, resnet"),
        ("scaling: {use_gpu: yes please}", r"scaling\.use_gpu: expected true or false"),
        ("scaling: {strategy: zero}", r"scaling\.strategy: expected one of ddp, fsdp"),
        ("scaling: {blocks: []}", r"scaling\.blocks: expected a list of module class names"),
        ("scaling: {cpu_offload: true}", r"scaling\.cpu_offload: expected false unless"),
        ("scaling: {num_workers: [3, 1]}", r"scaling\.num_workers: expected .* \[min, max\]"),
        (
            "scaling: {num_workers: [1, 3]}",
            r"train\.batch_size: .* multiple of 3 worker\(s\) .* \(elastic: every size from 1",
        ),
        ("tracking: {alias: champion}", r"tracking\.alias: expected a tracking\.register_as"),
        ("tracking: {register_as: d, alias: v2}", r"tracking\.alias: expected letters, digits"),
        (
            "tracking: {register_as: d, log_model: false}",
            r"tracking\.register_as: expected log_model: true",
        ),
        (
            "train: {batch_size: 63}",
            r"train\.batch_size: expected a global batch \(63 samples\) that is a multiple of",
        ),
    ],
)
def test_bad_values_name_the_field(tmp_path, text, message):
    with pytest.raises(SpecError, match=message):
        load_spec(write(tmp_path, "data: {path: x.csv}\n" + text + "\n"))


def test_validation_fraction_range(tmp_path):
    with pytest.raises(SpecError, match=r"data\.validation_fraction: expected a number between"):
        load_spec(write(tmp_path, "data: {path: x.csv, validation_fraction: 1.5}\n"))


def test_overrides_parse_yaml_values(tmp_path):
    path = write(tmp_path, "data: {path: x.csv}\n")
    spec = load_spec(
        path,
        [
            "train.epochs=3",
            "model.hidden=[32]",
            "train.grad_clip=null",
            "train.lr=1e-2",
            "tracking.run_name=abc",
        ],
    )
    assert (spec.train.epochs, spec.model.hidden, spec.train.grad_clip) == (3, [32], None)
    assert spec.train.lr == 0.01 and spec.tracking.run_name == "abc"
    with pytest.raises(SpecError, match="expected section.key=value"):
        apply_override({}, "train.epochs")


def test_missing_config_file(tmp_path):
    with pytest.raises(SpecError, match="config file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_micro_batch():
    spec = RunSpec.from_dict(
        {
            "data": {"path": "x"},
            "train": {"batch_size": 64, "grad_accum_steps": 2},
            "scaling": {"num_workers": 2},
        }
    )
    assert spec.micro_batch_size == 16
    assert spec.eval_batch_size == 16  # validation never takes more memory than training
    spec.train.eval_batch_size = 8
    assert spec.eval_batch_size == 8
