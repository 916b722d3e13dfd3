"""`trainyard k8s`: the KubeRay RayJob manifests written for the repository's specs validate
against KubeRay's RayJob CRD (tests/data/kuberay, vendored with its licence) made strict, so
that an unknown field fails; what the schema leaves open is checked here (submissionMode, the
resources against the spec's plan, the spec that travels in the ConfigMap), and no secret of
the environment reaches a manifest. No Ray, no Kubernetes: the manifests are data."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from trainyard.pipelines import cli
from trainyard.pipelines.config.spec import RunSpec, load_spec

ROOT = Path(__file__).resolve().parent.parent
CRD = ROOT / "tests" / "data" / "kuberay" / "ray.io_rayjobs.yaml"
COMMON = ["--image", "registry.example.com/team/trainyard:1", "--mlflow-uri", "http://mlflow:5000"]
S3 = ["--set", "scaling.storage_path=s3://bucket/trainyard"]
CASES = {
    "tabular": ["configs/digits.yaml", *S3],
    "images": ["configs/digits-images.yaml", *S3],
    "text": ["configs/stdlib-gpt-tiny.yaml", *S3],
    "gpu": ["configs/images-resnet18.yaml", *S3],
    "elastic": ["configs/digits.yaml", *S3, "--set", "scaling.num_workers=[1,2]"],
    "tune": ["configs/digits-tune.yaml", *S3, "--tune"],
    "pvc": [
        "configs/digits.yaml",
        *("--set", "scaling.storage_path=/mnt/trainyard", "--storage-pvc", "shared-rwx"),
        *("--mlflow-secret", "mlflow-login", "--ray-token-secret", "ray-token"),
        *("--model-key-secret", "model-key"),
        *("--node-selector", "pool=train", "--toleration", "dedicated=ml:NoSchedule"),
        *("--service-account", "trainer", "--namespace", "ml"),
    ],
}


@pytest.fixture(scope="module")
def strict_schema() -> dict:
    """The CRD's schema with `additionalProperties: false` on every object that lists its
    properties (KubeRay's own leaves them open)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(CRD.read_text(), Loader=loader)
    schema = copy.deepcopy(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])

    def strict(node):
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and isinstance(node.get("properties"), dict)
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    strict(schema)
    return schema


def write(tmp_path: Path, *args: str) -> list[dict]:
    out = tmp_path / "job.yaml"
    assert cli.main(["k8s", *args, *COMMON, "-f", str(out)]) == 0
    return list(yaml.safe_load_all(out.read_text()))


def errors(schema: dict, rayjob: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(rayjob)]


@pytest.mark.parametrize("case", CASES)
def test_manifests_validate_strictly_and_hold_the_specs_plan(case, strict_schema, tmp_path):
    from trainyard.pipelines.jobs.k8s import SUBMISSION_MODES

    args = CASES[case]
    configmap, rayjob = write(tmp_path, *args)
    assert errors(strict_schema, rayjob) == []
    job = rayjob["spec"]
    assert job["submissionMode"] in SUBMISSION_MODES
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    assert job["submitterPodTemplate"]["spec"]["containers"][0]["image"] == COMMON[1]
    # The spec travels whole in the ConfigMap the head mounts; the entrypoint runs it.
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    spec = load_spec(ROOT / args[0], overrides)
    assert RunSpec.from_dict(yaml.safe_load(configmap["data"]["spec.yaml"])) == spec
    command = "tune" if "--tune" in args else "train"
    assert job["entrypoint"] == f"trainyard {command} /etc/trainyard/spec.yaml"
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert "/etc/trainyard" in mounts
    volumes = {v["name"]: v for v in head["volumes"]}
    assert volumes["trainyard-spec"]["configMap"]["name"] == configmap["metadata"]["name"]
    # The worker pods hold the plan: one per worker (elastic: min to max), its CPUs and GPU.
    from trainyard.cluster.nodes import Nodes
    from trainyard.cluster.resources import plan_resources

    (group,) = job["rayClusterSpec"]["workerGroupSpecs"]
    sc = spec.scaling
    low, high = (sc.min_workers, sc.max_workers) if sc.elastic else (sc.num_workers,) * 2
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (low, low, high)
    assert job["rayClusterSpec"]["enableInTreeAutoscaling"] is sc.elastic
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpus, gpus = int(limits["cpu"]), int(limits.get("nvidia.com/gpu", 0))
    assert group["rayStartParams"]["num-cpus"] == limits["cpu"]
    assert gpus == (1 if sc.use_gpu else 0)
    head_cpus = int(head["containers"][0]["resources"]["limits"]["cpu"])
    nodes = Nodes.of([{"CPU": head_cpus}] + [{"CPU": cpus, "GPU": gpus}] * high)
    plan = plan_resources(sc, nodes)
    assert plan.num_workers == high and plan.cpus_per_worker <= cpus
    if case == "pvc":
        assert {"/etc/trainyard", "/mnt/trainyard"} <= mounts
        assert volumes["storage"]["persistentVolumeClaim"]["claimName"] == "shared-rwx"
        assert rayjob["metadata"]["namespace"] == "ml"
        assert head["nodeSelector"] == {"pool": "train"}
        assert head["tolerations"] == [
            {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
        ]
        assert head["serviceAccountName"] == "trainer"


def test_the_strict_schema_refuses_an_unknown_field(strict_schema, tmp_path):
    _, rayjob = write(tmp_path, *CASES["tabular"])
    rayjob["spec"]["shutdownAfterJobFinish"] = True  # (a typo of shutdownAfterJobFinishes)
    assert any("shutdownAfterJobFinish" in e for e in errors(strict_schema, rayjob))


def test_no_secret_reaches_a_manifest(tmp_path, monkeypatch, capsys):
    planted = {
        "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-pw-7391",
        "MLFLOW_TRACKING_USERNAME": "planted-user-7391",
        "RAY_AUTH_TOKEN": "planted-ray-token-7391",
        "AWS_SECRET_ACCESS_KEY": "planted-aws-7391",
    }
    for key, value in planted.items():
        monkeypatch.setenv(key, value)
    _, rayjob = write(tmp_path, *CASES["pvc"])
    text = (tmp_path / "job.yaml").read_text()
    assert "7391" not in text
    env = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env["env"] if "valueFrom" in e}
    assert refs["MLFLOW_TRACKING_PASSWORD"] == {
        "name": "mlflow-login",
        "key": "MLFLOW_TRACKING_PASSWORD",
    }
    assert refs["RAY_AUTH_TOKEN"] == {"name": "ray-token", "key": "token"}
    assert refs["TRAINYARD_MODEL_KEY"] == {"name": "model-key", "key": "key"}
    # A login in the tracking URI, storage only one pod sees, or a credential in the spec, is
    # one line, exit 2.
    capsys.readouterr()
    for args, says in (
        (["--mlflow-uri", "https://someone:pw-7391@mlflow.example.com"], "holds a login"),
        (["--set", "scaling.storage_path=/data/results"], "every pod must see"),
        (["--set", "data.path=s3://AKIA:pw-7391@bucket/x.csv", *S3], "holds a credential"),
        (["--name", "Digits_Job", *S3], "not a Kubernetes name"),
    ):
        rc = cli.main(["k8s", "configs/digits.yaml", *COMMON, *args])
        err = capsys.readouterr().err
        assert rc == 2 and says in err and err.count("\n") == 1 and "7391" not in err


PREDICT = ["--predict", "runs:/0123abcd/model", "s3://bucket/rows/", "--out", "s3://bucket/out"]
KEY = ["--model-key-secret", "model-key"]


@pytest.mark.parametrize(
    "extra, shape",
    [
        (["--workers", "6"], (2, 4, 0)),  # (6 actors of 0.9 CPU: 4 to a pod of 4 CPUs)
        (["--workers", "3", "--cpus-per-worker", "2", "--gpus-per-worker", "1"], (3, 4, 1)),
    ],
)
def test_a_predict_manifest_holds_its_actors_and_the_model_key(
    extra, shape, strict_schema, tmp_path
):
    """`trainyard k8s --predict`: the entrypoint is that `trainyard predict`, no ConfigMap,
    the worker pods hold --workers actors, and the pods get the model key from its Secret."""
    import shlex

    (rayjob,) = write(tmp_path, *PREDICT, *extra, *KEY)
    assert errors(strict_schema, rayjob) == []
    job = rayjob["spec"]
    assert shlex.split(job["entrypoint"]) == ["trainyard", "predict", *PREDICT[1:], *extra]
    (group,) = job["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    pods, cpus, gpus = shape
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == pods
    assert (int(limits["cpu"]), int(limits.get("nvidia.com/gpu", 0))) == (cpus, gpus)
    env = group["template"]["spec"]["containers"][0]["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    assert refs["TRAINYARD_MODEL_KEY"] == {"name": "model-key", "key": "key"}


def test_a_predict_manifest_refuses_what_would_fail_in_the_cluster(tmp_path, capsys):
    """No --workers, no model key, a path no pod sees, a mistake in predict's own arguments:
    one line each, exit 2, before anything is written."""
    capsys.readouterr()
    for args, says in (
        ([*PREDICT, *KEY], "--workers N"),
        ([*PREDICT, "--workers", "2"], "--model-key-secret NAME"),
        ([*PREDICT[:2], "/data/rows", "--out", "s3://b/o", "--workers", "2", *KEY], "/data/rows"),
        ([*PREDICT, "--workers", "2", "--format", "xlsx", *KEY], "invalid choice"),
        (
            [*PREDICT[:2], "s3://AKIA:pw@b/rows", "--out", "s3://b/o", "--workers", "2", *KEY],
            "carry credentials",
        ),
    ):
        with pytest.raises(SystemExit) if "invalid" in says else contextlib.nullcontext():
            rc = cli.main(["k8s", *args, *COMMON, "-f", str(tmp_path / "job.yaml")])
            assert rc == 2
        err = capsys.readouterr().err
        assert says in err, err
    assert not (tmp_path / "job.yaml").exists()
    # On the claim: both paths under its mount, the claim mounted there on every pod.
    local = ["--predict", "runs:/0123abcd/model", "/mnt/trainyard/rows", "--out"]
    claim = ["/mnt/trainyard/out", "--workers", "2", "--storage-pvc", "rwx", *KEY]
    (rayjob,) = write(tmp_path, *local, *claim)
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["volumes"] == [{"name": "storage", "persistentVolumeClaim": {"claimName": "rwx"}}]
    assert head["containers"][0]["volumeMounts"] == [
        {"name": "storage", "mountPath": "/mnt/trainyard"}
    ]
