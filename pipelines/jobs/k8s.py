"""`trainyard k8s CONFIG`: a KubeRay `RayJob` manifest (apiVersion ray.io/v1) for a run spec,
the way teams that run Ray on Kubernetes submit training.

    trainyard k8s CONFIG --image IMAGE --mlflow-uri URI [--tune] [--set key=value ...]
                  [--storage-pvc CLAIM] [--mlflow-secret NAME] [--ray-token-secret NAME]
                  [--namespace NS] [--name NAME] [--node-selector k=v ...]
                  [--toleration key[=value]:Effect ...] [--service-account SA]
                  [--cpus-per-node C] [--memory-per-cpu Gi] [--head-cpus C] [--ttl S]
                  [--out FILE]

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

import yaml

from trainyard.cluster.errors import SpecError, TrainyardError
from trainyard.cluster.secrets import redact
from trainyard.pipelines.config.spec import RunSpec, load_spec

RAY_VERSION = "2.60.0"
SPEC_DIR = "/etc/trainyard"
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
"""The values KubeRay's CRD leaves open (no enum in its schema)."""
NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trainyard.pipelines.training.driver import add_spec_arguments

    add_spec_arguments(parser, "run spec (YAML)")
    parser.add_argument("--tune", action="store_true", help="the spec's search (trainyard tune)")
    parser.add_argument("--image", required=True, help="container image: trainyard, torch, Ray")
    parser.add_argument(
        "--mlflow-uri", required=True, help="MLflow tracking server every pod reaches (no login)"
    )
    parser.add_argument("--mlflow-secret", help="Secret with MLFLOW_TRACKING_USERNAME/PASSWORD")
    parser.add_argument("--ray-token-secret", help="Secret whose key `token` is Ray's token")
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
    parser.add_argument("--out", help="write the manifest here (default: standard output)")


def command(args: argparse.Namespace) -> int:
    spec = load_spec(args.config, args.overrides)
    docs = manifest(spec, args)
    text = yaml.safe_dump_all(docs, sort_keys=False)
    if args.out:
        Path(args.out).write_text(text)
        print(f"trainyard: wrote {args.out}: kubectl apply -f {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def manifest(spec: RunSpec, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ConfigMap with the spec and the RayJob that runs it (see the module's docstring)."""
    name = args.name or re.sub(r"[^a-z0-9-]+", "-", spec.tracking.experiment.lower()).strip("-")
    name = name[:40].strip("-") or "trainyard"
    if not NAME.fullmatch(name):
        raise TrainyardError(f"--name: {name!r} is not a Kubernetes name (a-z, 0-9, -)")
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
        mounts.append({"name": "storage", "mountPath": storage})
        volumes.append(
            {"name": "storage", "persistentVolumeClaim": {"claimName": args.storage_pvc}}
        )
    shape = node_shape(spec, args)
    env = pod_env(args)
    scheduling = pod_scheduling(args)
    sc = spec.scaling
    low, high = (sc.min_workers, sc.max_workers) if sc.elastic else (sc.num_workers,) * 2
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
    command_name = "tune" if args.tune else "train"
    cluster = {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": sc.elastic,
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
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": args.namespace, "labels": labels(spec)},
        "spec": {
            "entrypoint": f"trainyard {command_name} {SPEC_DIR}/spec.yaml"
            + (f" --resume {shlex.quote(args.resume)}" if args.resume else ""),
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
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-spec", "namespace": args.namespace, "labels": labels(spec)},
        "data": {"spec.yaml": yaml.safe_dump(resolved, sort_keys=False)},
    }
    return [configmap, rayjob]


def node_shape(spec: RunSpec, args: argparse.Namespace) -> dict[str, int]:
    """Each worker pod's CPUs and GPUs: one pod per training worker, of the CPUs trainyard's
    plan gives a worker (`--cpus-per-node`, else scaling.cpus_per_worker rounded up, else 4).
    The plan is run on these pods and the head: a spec that would not fit is a SpecError."""
    from trainyard.cluster.resources import Nodes, plan_resources

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


def labels(spec: RunSpec) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": "trainyard", "trainyard/pipeline": spec.pipeline}


def check_uri(uri: str) -> None:
    """A tracking URI every pod reaches, without a login in it (the login is a Secret's)."""
    from urllib.parse import urlsplit

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
