"""What the workers log to the job's MLflow run: rank 0's metrics and tags (`RankZeroLogger`,
a no-op on other ranks, which writes in the background) and each node's system metrics."""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from typing import Any

from trainyard.pipelines.tracking.runs import mlflow_client


@contextlib.contextmanager
def system_metrics(uri: str, run_id: str, node: str, interval_s: float):
    """MLflow's system-metrics monitor for this node while the block runs: CPU, memory, disk
    and network (and each GPU's, where nvidia-ml-py is installed) every `interval_s` seconds
    into the run, as `system/<node>/<metric>`. One process per node runs it (the node's first
    worker); it samples the whole machine. It is imported and started in a thread of its own,
    off the way to the first step. As the block ends, one last sample is written (MLflow's
    monitor drops the one it holds when stopped): a run shorter than the interval still has
    one per node, its CPU use averaged over the block. A monitor that cannot start (no psutil)
    says so and the block runs without it."""
    monitors: list[Any] = []

    def start() -> None:
        # Its INFO lines (started, stopping, no GPU metrics) say nothing a user acts on.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                run_id,
                sampling_interval=interval_s,
                node_id=node,
                tracking_uri=uri,
                resume_logging=True,  # (a restarted worker group goes on from the last step)
            )
            monitor.start()
            monitors.append(monitor)
        except Exception as e:  # (e.g. no psutil: training goes on without the metrics)
            logging.getLogger("trainyard").warning("no system metrics from %s: %s", node, e)

    starting = threading.Thread(target=start, name="trainyard-system-metrics", daemon=True)
    starting.start()
    try:
        yield
    finally:
        starting.join()
        for monitor in monitors:
            monitor.finish()
            try:
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
            except Exception as e:  # (the run stands without its last sample)
                logging.getLogger("trainyard").warning("last system metrics of %s: %s", node, e)


class RankZeroLogger:
    """Logs metrics and tags to the job's run from rank 0; does nothing on other ranks.

    On rank 0 every call is queued to one thread of its own, which creates the MLflow client
    (importing MLflow and opening the store: seconds) and makes the calls in order: none of it
    is on the way to the first step, and a step never waits for the store. `flush` waits until
    everything queued so far is stored, and raises what failed meanwhile.

    A run resumed from a checkpoint recomputes the epochs after it, some of which it may have
    logged before the failure: a metric step already in the run is never logged again, so each
    metric's history stays one point per step.
    """

    def __init__(self, uri: str, run_id: str, rank: int):
        self.run_id = run_id
        self.active = rank == 0
        self._last_step: dict[str, int] = {}
        self._restarted = False
        self._failed: BaseException | None = None
        if self.active:
            self._queue: queue.Queue = queue.Queue()
            threading.Thread(
                target=self._serve, args=(uri,), name="mlflow-logger", daemon=True
            ).start()

    def _serve(self, uri: str) -> None:
        client = None
        while True:
            call = self._queue.get()
            try:
                client = client or mlflow_client(uri)
                call(client)
            except BaseException as e:  # kept for flush, which raises it on the training thread
                self._failed = self._failed or e

    def _later(self, call) -> None:
        if self.active:
            self._queue.put(call)

    def flush(self) -> None:
        """Wait until every call so far is stored (before each checkpoint, so that a run
        resumed from it never misses a metric of the epochs before it); raise what failed."""
        if not self.active:
            return

        done = threading.Event()
        self._queue.put(lambda client: done.set())
        done.wait()
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed

    def metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        values = {k: float(v) for k, v in values.items() if math.isfinite(float(v))}
        self._later(lambda client: self._log_metrics(client, values, step, now))

    def _log_metrics(self, client: Any, values: dict[str, float], step: int, now: int) -> None:
        from mlflow.entities import Metric

        batch = []
        for key, value in values.items():
            if key not in self._last_step:
                history = client.get_metric_history(self.run_id, key)
                self._last_step[key] = max((m.step for m in history), default=-1)
            if step > self._last_step[key]:
                self._last_step[key] = step
                batch.append(Metric(key, value, now, step))
        if batch:
            client.log_batch(self.run_id, metrics=batch)

    def tags(self, values: dict[str, str]) -> None:
        values = dict(values)
        self._later(lambda client: self._log_tags(client, values))

    def _log_tags(self, client: Any, values: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])

    def text(self, text: str, artifact_file: str) -> None:
        """Store `text` as the run's artifact `artifact_file`."""
        self._later(lambda client: client.log_text(self.run_id, text, artifact_file))

    def started(
        self, checkpoint_epoch: int | None, world: int, up_at: float, step: int = 0
    ) -> None:
        """This attempt's workers started their train function at `up_at`, `world` of them,
        from the checkpoint of `checkpoint_epoch` (None: from the start), after optimizer
        step `step`. A start after a checkpoint, or after an earlier attempt that trained (its
        first step is tagged), is a restart: counted and tagged with when, from where and on
        how many workers (the metric num_workers, one point per start, shows an elastic run's
        sizes), and the step it resumes after (`trainyard.resumed_step.<n>`)."""
        at = time.time()
        self._later(
            lambda client: self._record_start(client, checkpoint_epoch, world, at, up_at, step)
        )

    def _record_start(
        self,
        client: Any,
        checkpoint_epoch: int | None,
        world: int,
        at: float,
        up_at: float,
        step: int,
    ) -> None:
        tags = client.get_run(self.run_id).data.tags
        self._restarted = checkpoint_epoch is not None or "trainyard.first_step_at" in tags
        count = int(tags.get("trainyard.restarts", 0)) + self._restarted
        self._log_metrics(client, {"num_workers": world}, count, int(at * 1000))
        up = "resumed_workers_up_at" if self._restarted else "workers_up_at"
        self._log_tags(client, {f"trainyard.{up}": f"{up_at:.3f}"})
        if not self._restarted:
            return
        after = checkpoint_epoch or 0
        was = tags.get("num_workers")  # (the earlier attempt's size, until this one tags its own)
        resized = f" (was {was})" if was and was != str(world) else ""
        when = f"after epoch {after} at {at:.3f} on {world} worker(s){resized}"
        self._log_tags(
            client,
            {
                "trainyard.restarts": count,
                f"trainyard.restart.{count}": when,
                f"trainyard.resumed_step.{count}": step,
            },
        )
        self._log_metrics(client, {"restarted_after_epoch": after}, count, int(at * 1000))
        logging.getLogger("trainyard").info(
            f"restart {count}: resuming after step {step} (epoch {after} done) on {world} "
            f"worker(s){resized}"
        )

    def preempted(self, nodes: list[str], deadline: float | None, step: int) -> None:
        """A preemption notice for `nodes` (going at `deadline`, Unix time) was checkpointed at
        optimizer step `step`: tagged `trainyard.preempted.<n>` (n counts the run's notices)."""
        at = time.time()

        def tag(client: Any) -> None:
            tags = client.get_run(self.run_id).data.tags
            n = 1 + sum(k.startswith("trainyard.preempted.") for k in tags)
            until = f"{deadline:.3f}" if deadline else "-"
            said = f"node {','.join(nodes)} deadline {until} step {step} at {at:.3f}"
            self._log_tags(client, {f"trainyard.preempted.{n}": said})

        self._later(tag)

    def checks(self, asks: int, seconds: float) -> None:
        """What this attempt's preemption checks cost (training.preemption.PreemptionCheck)."""
        if asks:
            said = {"trainyard.preemption_checks": f"{asks} in {seconds:.3f} s"}
            self._later(lambda client: self._log_tags(client, said))

    def first_step(self, at: float) -> None:
        """This attempt's first optimizer step finished at `at` (a restart's: resumed_step_at)."""

        def tag(client: Any) -> None:
            key = "resumed_step_at" if self._restarted else "first_step_at"
            self._log_tags(client, {f"trainyard.{key}": f"{at:.3f}"})

        self._later(tag)
