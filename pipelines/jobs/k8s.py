"""`trainyard k8s CONFIG`: a KubeRay `RayJob` manifest (apiVersion ray.io/v1) for a run spec,
the way teams that run Ray on Kubernetes submit training; `trainyard k8s --predict` one for
batch prediction.

    trainyard k8s CONFIG --image IMAGE --mlflow-uri URI [--tune] [--set key=value ...]
                  [--storage-pvc CLAIM] [--mlflow-secret NAME] [--ray-token-secret NAME]
                  [--model-key-secret NAME] [--namespace NS] [--name NAME]
                  [--node-selector k=v ...] [--toleration key[=value]:Effect ...]
                  [--service-account SA] [--cpus-per-node C] [--memory-per-cpu Gi]
                  [--head-cpus C] [--ttl S] [-f FILE]
    trainyard k8s --predict MODEL DATA --out URI --workers N [predict's options]
                  --image IMAGE --mlflow-uri URI --model-key-secret NAME [the options above]

What the manifest holds, and where it comes from:
- Two documents: a ConfigMap with the resolved spec (`spec.yaml`, the `--set` overrides
  applied), and the RayJob. The spec travels as a ConfigMap, mounted on the head pod where the
  job's driver runs, rather than inside the entrypoint: it stays readable and diffable
  (`kubectl get configmap NAME-spec -o yaml`), no shell quoting touches it, and it is replaced
  with the manifest. The spec is checked first, as `trainyard train --dry-run` checks it.
- The head group runs the driver, Ray Data's preprocessing and the MLflow client (`--head-cpus`,
  4 by default: what the plan keeps for Ray Data). One worker group holds the training workers,
  a pod per worker, each of the CPUs the plan gives a worker (`--cpus-per-node` to choose them)
  and, for `scaling.use_gpu`, one `nvidia.com/gpu`. An elastic spec (`num_workers: [min, max]`)
  gives `minReplicas`/`maxReplicas` and KubeRay's autoscaler. trainyard's own resource plan
  runs on these pods before the manifest is written: the workers and Ray Data's CPUs must fit
  as they will on the cluster, or it is one line.
- The entrypoint is `trainyard train /etc/trainyard/spec.yaml` (`trainyard tune` with --tune),
  run from the image's working directory: the image must hold trainyard, its torch build and
  Ray 2.60, and the project's code that the spec names as module:attr.
- `scaling.storage_path` must be what every pod sees: an object-store URI (s3://, gs://, ...),
  or a path on a ReadWriteMany PersistentVolumeClaim that `--storage-pvc` mounts there.
- Secrets never enter the manifest: the MLflow login (`MLFLOW_TRACKING_USERNAME`,
  `MLFLOW_TRACKING_PASSWORD`) comes from the Kubernetes Secret `--mlflow-secret`, Ray's token
  (`RAY_AUTH_TOKEN`, with `RAY_AUTH_MODE=token`) from `--ray-token-secret`, both as
  `secretKeyRef`s; a tracking URI with a login in it is refused.
- The model key (`TRAINYARD_MODEL_KEY`) that trainyard signs logged models with and `predict`
  checks them with comes from the Secret `--model-key-secret` (key `key`): without it each pod
  makes a key of its own, and no later job could load the model. `--predict` requires it
  (unless `--trust-model`); `train` and `tune` say what the model will be signed with.
- `--predict` runs `trainyard predict` as the entrypoint, its arguments checked here as
  `trainyard predict` checks them: no ConfigMap; the worker group holds `--workers` actors
  (`--cpus-per-worker`, `--gpus-per-worker`), as many to a pod as its CPUs take (a GPU pod:
  one GPU, or what one actor asks for). DATA and
  `--out` are URIs, or paths under /mnt/trainyard where `--storage-pvc` is mounted.
- `shutdownAfterJobFinishes: true` with `ttlSecondsAfterFinished` (`--ttl`, 3600 s): the Ray
  cluster goes when the job ends, and the RayJob an hour later. `submissionMode` is
  K8sJobMode: a submitter pod (`submitterPodTemplate`) submits the entrypoint to the head.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from trainyard.cluster.errors import SpecError, TrainyardError
from trainyard.cluster.nodes import Nodes
from trainyard.cluster.resources import plan_resources
from trainyard.cluster.secrets import redact
from trainyard.cluster.signing import KEY_ENV
from trainyard.pipelines.config.overrides import add_spec_arguments
from trainyard.pipelines.config.spec import RunSpec, load_spec
from trainyard.pipelines.jobs import predict

RAY_VERSION = "2.60.0"
SPEC_DIR = "/etc/trainyard"
PVC_MOUNT = "/mnt/trainyard"
"""Where `--predict` mounts `--storage-pvc`: its local DATA and --out are paths under it."""
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
"""The values KubeRay's CRD leaves open (no enum in its schema)."""
NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_arguments(parser, "run spec (YAML)")
    parser.add_argument("--tune", action="store_true", help="the spec's search (trainyard tune)")
    add_cluster_arguments(parser)


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """What the manifest's pods are: the options of both forms of the command."""
    parser.add_argument("--image", required=True, help="container image: trainyard, torch, Ray")
    parser.add_argument(
        "--mlflow-uri", required=True, help="MLflow tracking server every pod reaches (no login)"
    )
    parser.add_argument("--mlflow-secret", help="Secret with MLFLOW_TRACKING_USERNAME/PASSWORD")
    parser.add_argument("--ray-token-secret", help="Secret whose key `token` is Ray's token")
    parser.add_argument(
        "--model-key-secret", help="Secret whose key `key` is the model-signing key"
    )
    parser.add_argument("--storage-pvc", help="ReadWriteMany claim mounted at storage_path")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--name", help="the RayJob's name (default: from the spec's experiment)")
    parser.add_argument(
        "--node-selector", action="append", default=[], metavar="KEY=VALUE", help="(repeatable)"
    )
    parser.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE]:EFFECT")
    parser.add_argument("--service-account", help="the pods' service account")
    parser.add_argument("--cpus-per-node", type=int, help="CPUs of each worker pod")
    parser.add_argument("--memory-per-cpu", type=float, default=4.0, metavar="GI")
    parser.add_argument("--head-cpus", type=int, default=4, help="CPUs of the head pod (4)")
    parser.add_argument("--ttl", type=int, default=3600, help="seconds the ended RayJob stays")
    parser.add_argument("--submission-mode", choices=SUBMISSION_MODES, default="K8sJobMode")
    parser.add_argument("-f", "--file", help="write the manifest here (default: standard output)")


def command(args: argparse.Namespace) -> None:
    spec = load_spec(args.config, args.overrides)
    docs = manifest(spec, args)
    if not args.model_key_secret:
        print(
            "trainyard: note: without --model-key-secret the model is signed with a key the "
            "pods make and lose: `trainyard predict` elsewhere will refuse it",
            file=sys.stderr,
        )
    emit(docs, args.file)


def predict_command(argv: list[str]) -> None:
    """`trainyard k8s --predict MODEL DATA --out URI --workers N [predict's options] --image
    ... --mlflow-uri ...`: a RayJob whose entrypoint is that `trainyard predict`."""
    parser = argparse.ArgumentParser(prog="trainyard k8s --predict", allow_abbrev=False)
    add_cluster_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    predicted = predict.job_arguments(rest, "trainyard k8s --predict")
    emit(predict_manifest(predicted, rest, args), args.file)


def emit(docs: list[dict[str, Any]], file: str | None) -> None:
    text = yaml.safe_dump_all(docs, sort_keys=False, width=1000)  # (entrypoints on one line)
    if file:
        Path(file).write_text(text)
        print(f"trainyard: wrote {file}: kubectl apply -f {file}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def manifest(spec: RunSpec, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ConfigMap with the spec and the RayJob that runs it (see the module's docstring)."""
    name = job_name(args.name, spec.tracking.experiment)
    check_uri(args.mlflow_uri)
    resolved = spec.to_dict()
    if redact(resolved) != resolved:
        raise TrainyardError(
            "the spec holds a credential (a secret-named key, or a login or signature in a "
            "URI): a manifest is read by whoever reads the namespace; give it to the pods from "
            "a Secret (as an environment variable the library reads) instead"
        )
    storage = spec.scaling.storage_path
    mounts, volumes = [spec_mount()], [spec_volume(name)]
    if storage is None or "://" not in storage:
        if not args.storage_pvc:
            raise TrainyardError(
                f"scaling.storage_path: {storage or 'unset'}: every pod must see the run's "
                "checkpoints; set it to an object-store URI (s3://..., gs://...), or to a path "
                "and give --storage-pvc CLAIM (a ReadWriteMany PersistentVolumeClaim)"
            )
        if storage is None or not storage.startswith("/"):
            raise TrainyardError(
                f"scaling.storage_path: {storage or 'unset'}: with --storage-pvc, an absolute "
                "path where the claim is mounted (e.g. /mnt/trainyard)"
            )
        mounts.append(storage_mount(storage))
        volumes.append(storage_volume(args.storage_pvc))
    shape = node_shape(spec, args)
    sc = spec.scaling
    low, high = (sc.min_workers, sc.max_workers) if sc.elastic else (sc.num_workers,) * 2
    entrypoint = f"trainyard {'tune' if args.tune else 'train'} {SPEC_DIR}/spec.yaml" + (
        f" --resume {shlex.quote(args.resume)}" if args.resume else ""
    )
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"{name}-spec",
            "namespace": args.namespace,
            "labels": labels(spec.pipeline),
        },
        "data": {"spec.yaml": yaml.safe_dump(resolved, sort_keys=False)},
    }
    job = rayjob(name, entrypoint, args, shape, (low, high), mounts, volumes, spec.pipeline)
    return [configmap, job]


def predict_manifest(
    predicted: argparse.Namespace, argv: list[str], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The RayJob of `trainyard predict ARGV` (checked as `predicted`): a worker group that
    holds its `--workers` actors, the model key from a Secret, the data and output where
    every pod sees them."""
    name = job_name(args.name, "predict")
    check_uri(args.mlflow_uri)
    if not predicted.workers:
        raise TrainyardError(
            "--workers N: the manifest sizes the cluster for N actors (in a job of its own, "
            "predict's default of one per CPU has no cluster to count)"
        )
    if not (args.model_key_secret or predicted.trust_model):
        raise TrainyardError(
            "--model-key-secret NAME: predict loads only models signed with the training "
            "run's key; give the pods that key from a Secret (key `key`; see docs/cluster.md)"
        )
    mounts: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    local = [p for p in (predicted.data, predicted.out) if "://" not in p]
    if local:
        outside = [p for p in local if not (p + "/").startswith(PVC_MOUNT + "/")]
        if outside or not args.storage_pvc:
            raise TrainyardError(
                f"{', '.join(outside or local)}: every pod must see the data and the output: "
                f"give URIs (s3://..., gs://...), or paths under {PVC_MOUNT} and "
                "--storage-pvc CLAIM (a ReadWriteMany PersistentVolumeClaim mounted there)"
            )
        mounts.append(storage_mount(PVC_MOUNT))
        volumes.append(storage_volume(args.storage_pvc))
    cpus = args.cpus_per_node or 4
    per_actor = predicted.cpus_per_worker
    per_pod = math.floor(cpus / per_actor) if per_actor > 0 else predicted.workers
    if per_pod < 1:
        raise TrainyardError(
            f"--cpus-per-worker {per_actor:g} does not fit a pod of {cpus} CPUs: raise "
            "--cpus-per-node"
        )
    per_gpu = predicted.gpus_per_worker
    if per_gpu > 0:  # (a pod of one GPU, or of the GPUs one actor asks for)
        per_pod = min(per_pod, max(1, math.floor(1 / per_gpu + 1e-9)))
    per_pod = min(per_pod, predicted.workers)
    gpus = math.ceil(per_pod * per_gpu - 1e-9)
    pods = math.ceil(predicted.workers / per_pod)
    entrypoint = shlex.join(["trainyard", "predict", *argv])
    shape = {"cpus": cpus, "gpus": gpus}
    return [rayjob(name, entrypoint, args, shape, (pods, pods), mounts, volumes, "predict")]


def rayjob(
    name: str,
    entrypoint: str,
    args: argparse.Namespace,
    shape: dict[str, int],
    replicas: tuple[int, int],
    mounts: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
    pipeline: str,
) -> dict[str, Any]:
    """The RayJob: a head pod, one group of `replicas` (min, max) worker pods of `shape`, the
    submitter pod, each with the environment `pod_env` gives and the scheduling flags."""
    env = pod_env(args)
    scheduling = pod_scheduling(args)
    low, high = replicas
    head = pod(args.image, "ray-head", args.head_cpus, 0, args.memory_per_cpu, env, mounts)
    worker = pod(
        args.image, "ray-worker", shape["cpus"], shape["gpus"], args.memory_per_cpu, env, mounts
    )
    group = {
        "groupName": "gpu-workers" if shape["gpus"] else "cpu-workers",
        "replicas": low,
        "minReplicas": low,
        "maxReplicas": high,
        "rayStartParams": {"num-cpus": str(shape["cpus"])}
        | ({"num-gpus": str(shape["gpus"])} if shape["gpus"] else {}),
        "template": {"spec": {"containers": [worker], "volumes": volumes} | scheduling},
    }
    cluster = {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": low != high,
        "headGroupSpec": {
            # The head runs the driver and Ray Data's tasks, never a training worker's GPU.
            "rayStartParams": {"num-cpus": str(args.head_cpus), "dashboard-host": "0.0.0.0"},
            "template": {"spec": {"containers": [head], "volumes": volumes} | scheduling},
        },
        "workerGroupSpecs": [group],
    }
    submitter = {
        "name": "ray-job-submitter",
        "image": args.image,
        "resources": {
            "requests": {"cpu": "500m", "memory": "512Mi"},
            "limits": {"cpu": "1", "memory": "1Gi"},
        },
        "env": [e for e in env if e["name"].startswith("RAY_")],
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": args.namespace, "labels": labels(pipeline)},
        "spec": {
            "entrypoint": entrypoint,
            "runtimeEnvYAML": f"env_vars:\n  MLFLOW_TRACKING_URI: {args.mlflow_uri}\n",
            "submissionMode": args.submission_mode,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": args.ttl,
            "backoffLimit": 0,
            "rayClusterSpec": cluster,
            "submitterPodTemplate": {
                "spec": {"restartPolicy": "Never", "containers": [submitter]} | scheduling
            },
        },
    }


def job_name(given: str | None, fallback: str) -> str:
    """--name as given (refused unless a Kubernetes name: a-z, 0-9 and -), else one made from
    `fallback` (the experiment; "predict")."""
    name = given or re.sub(r"[^a-z0-9-]+", "-", fallback.lower()).strip("-")
    name = name[:40].strip("-") or "trainyard"
    if not NAME.fullmatch(name):
        raise TrainyardError(f"--name: {name!r} is not a Kubernetes name (a-z, 0-9, -)")
    return name


def node_shape(spec: RunSpec, args: argparse.Namespace) -> dict[str, int]:
    """Each worker pod's CPUs and GPUs: one pod per training worker, of the CPUs trainyard's
    plan gives a worker (`--cpus-per-node`, else scaling.cpus_per_worker rounded up, else 4).
    The plan is run on these pods and the head: a spec that would not fit is a SpecError."""
    sc = spec.scaling
    cpus = args.cpus_per_node or max(1, math.ceil(sc.cpus_per_worker or 4))
    gpus = 1 if sc.use_gpu else 0
    workers = sc.max_workers
    nodes = Nodes.of(
        [{"CPU": float(args.head_cpus), "GPU": 0.0}]
        + [{"CPU": float(cpus), "GPU": float(gpus)}] * workers
    )
    try:
        plan = plan_resources(sc, nodes)
    except SpecError as e:
        raise TrainyardError(
            f"the pods ({args.head_cpus} CPUs on the head, {workers} × {cpus} CPUs"
            f"{f' + {gpus} GPU' if gpus else ''}) do not hold the spec's plan: {e}"
        ) from None
    if plan.num_workers != workers or plan.cpus_per_worker > cpus:
        raise TrainyardError(
            f"the pods hold {plan.num_workers} worker(s) of {plan.cpus_per_worker:g} CPUs, not "
            f"the spec's {workers}: raise --cpus-per-node or --head-cpus"
        )
    return {"cpus": cpus, "gpus": gpus}


def pod(
    image: str,
    name: str,
    cpus: int,
    gpus: int,
    memory_per_cpu: float,
    env: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
) -> dict[str, Any]:
    """A Ray container: requests equal to limits (a node Ray counts on is what it gets)."""
    memory = f"{math.ceil(cpus * memory_per_cpu)}Gi"
    limits = {"cpu": str(cpus), "memory": memory} | ({"nvidia.com/gpu": str(gpus)} if gpus else {})
    container = {
        "name": name,
        "image": image,
        "resources": {"requests": dict(limits), "limits": limits},
        "env": env,
        "volumeMounts": mounts,
    }
    if name == "ray-head":
        ports = (("gcs", 6379), ("dashboard", 8265), ("client", 10001))
        container["ports"] = [{"name": n, "containerPort": p} for n, p in ports]
    return container


def pod_env(args: argparse.Namespace) -> list[dict[str, Any]]:
    """What every Ray container is told: the tracking URI; the MLflow login and Ray's token
    only as references to Secrets."""
    env: list[dict[str, Any]] = [{"name": "MLFLOW_TRACKING_URI", "value": args.mlflow_uri}]
    if args.mlflow_secret:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            ref = {"name": args.mlflow_secret, "key": key}
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    if args.ray_token_secret:
        env.append({"name": "RAY_AUTH_MODE", "value": "token"})
        ref = {"name": args.ray_token_secret, "key": "token"}
        env.append({"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": ref}})
    if args.model_key_secret:
        ref = {"name": args.model_key_secret, "key": "key"}
        env.append({"name": KEY_ENV, "valueFrom": {"secretKeyRef": ref}})
    return env


def pod_scheduling(args: argparse.Namespace) -> dict[str, Any]:
    """Node selectors, tolerations and the service account, on every pod."""
    out: dict[str, Any] = {}
    if args.node_selector:
        selectors = {}
        for item in args.node_selector:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise TrainyardError(f"--node-selector: {item!r}: expected KEY=VALUE")
            selectors[key] = value
        out["nodeSelector"] = selectors
    if args.toleration:
        out["tolerations"] = [toleration(t) for t in args.toleration]
    if args.service_account:
        out["serviceAccountName"] = args.service_account
    return out


def toleration(text: str) -> dict[str, str]:
    """`key=value:Effect` (operator Equal) or `key:Effect` (operator Exists)."""
    head, sep, effect = text.rpartition(":")
    if not sep or effect not in EFFECTS or not head:
        raise TrainyardError(
            f"--toleration: {text!r}: expected KEY[=VALUE]:EFFECT, EFFECT one of "
            + ", ".join(EFFECTS)
        )
    key, eq, value = head.partition("=")
    if eq:
        return {"key": key, "operator": "Equal", "value": value, "effect": effect}
    return {"key": key, "operator": "Exists", "effect": effect}


def spec_mount() -> dict[str, Any]:
    return {"name": "trainyard-spec", "mountPath": SPEC_DIR, "readOnly": True}


def spec_volume(name: str) -> dict[str, Any]:
    return {"name": "trainyard-spec", "configMap": {"name": f"{name}-spec"}}


def storage_mount(path: str) -> dict[str, Any]:
    return {"name": "storage", "mountPath": path}


def storage_volume(claim: str) -> dict[str, Any]:
    return {"name": "storage", "persistentVolumeClaim": {"claimName": claim}}


def labels(pipeline: str) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": "trainyard", "trainyard/pipeline": pipeline}


def check_uri(uri: str) -> None:
    """A tracking URI every pod reaches, without a login in it (the login is a Secret's)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        raise TrainyardError(
            f"--mlflow-uri: {uri}: pods need an MLflow server (http:// or https://); a local "
            "store would stay inside one pod"
        )
    if parts.username or parts.password:
        raise TrainyardError(
            "--mlflow-uri: holds a login; put it in a Secret (--mlflow-secret NAME, keys "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD), never in the manifest"
        )
