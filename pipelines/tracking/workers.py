"""What the workers log to the job's MLflow run: rank 0's metrics and tags (`RankZeroLogger`,
a no-op on other ranks, which writes in the background) and each node's system metrics."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from typing import Any

from trainyard.pipelines.tracking.outage import Outage, reason, unreachable
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
        # Its INFO lines (started, stopping, no GPU metrics) say nothing a user acts on, nor
        # its warnings while the tracking server is away (rank 0's logger says that once).
        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
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
                if not unreachable(e):  # (an outage: rank 0's logger has said so)
                    log.warning(f"last system metrics of {node}: {reason(e)}")


PERSISTED = ("_log_metrics", "_log_tags", "_log_text", "_log_preempted")
"""The records that a checkpoint keeps while they wait for the server (`pending`): what the run
says, not facts of one attempt (its start, its first step)."""


class RankZeroLogger:
    """Logs metrics and tags to the job's run from rank 0; does nothing on other ranks.

    On rank 0 every call becomes a record, sent in order by one thread of its own, which
    creates the MLflow client (importing MLflow and opening the store: seconds): none of it is
    on the way to the first step, and a step never waits for the store. A tracking server that
    does not answer (restarted, upgraded, out of reach) holds the records, not the training:
    the thread tries the next record again with a growing wait (1 s to 10 s) for as long as the
    run lasts, and sends them in order once the server is back, each exactly once. The console
    says so twice: when the server stops answering, and when it is back. `flush` waits until
    everything so far is stored while the server answers, returns at once while it does not
    (the records wait in `pending`, which each checkpoint keeps: a run restarted from it sends
    them, `replay`), and raises what the server refused meanwhile.

    A run resumed from a checkpoint recomputes the epochs after it, some of which it may have
    logged before the failure: a metric step already in the run is never logged again, so each
    metric's history stays one point per step.
    """

    def __init__(self, uri: str, run_id: str, rank: int, background: bool = True):
        self.uri, self.run_id = uri, run_id
        self.active = rank == 0
        self._last_step: dict[str, int] = {}
        self._restarted = False
        self._failed: BaseException | None = None
        self._records: list[tuple[str, tuple]] = []
        """Records not stored yet, the one being sent first."""
        self._changed = threading.Condition()
        self.outage = Outage()
        if self.active and background:
            threading.Thread(
                target=self._serve, args=(uri,), name="mlflow-logger", daemon=True
            ).start()

    @property
    def away_since(self) -> float | None:
        """When the server stopped answering (None while it answers)."""
        return self.outage.since

    def _serve(self, uri: str) -> None:
        client = None
        while True:
            with self._changed:
                while not self._records:
                    self._changed.wait()
                count, name, args = next_request(self._records)
            try:
                client = client or mlflow_client(uri)
                getattr(self, name)(client, *args)
            except BaseException as e:
                if unreachable(e):  # the records stay first; tried again after a wait
                    if self.outage.began():
                        log.warning(
                            f"trainyard: the MLflow server at {uri} does not answer ({reason(e)}); "
                            "training goes on, and what it logs is sent when the server is back"
                        )
                    self.outage.pause()
                    continue
                self._failed = self._failed or e  # kept for flush, which raises it
            if (away := self.outage.ended()) is not None:
                log.warning(
                    f"trainyard: the MLflow server is back after {away:.0f} s; sending the "
                    f"{len(self._records)} record(s) it missed"
                )
            with self._changed:
                del self._records[:count]
                self._changed.notify_all()

    def _later(self, name: str, *args: Any) -> None:
        if self.active:
            with self._changed:
                self._records.append((name, args))
                self._changed.notify_all()

    def flush(self) -> None:
        """Wait until every record so far is stored, unless the server does not answer (each
        checkpoint keeps what waits: `pending`); raise what the server refused meanwhile."""
        if not self.active:
            return
        with self._changed:
            while self._records and self.away_since is None:
                self._changed.wait(timeout=1.0)
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed

    def pending(self) -> list[list]:
        """The records the server has yet to store that a checkpoint keeps (plain data)."""
        with self._changed:
            return [[name, list(args)] for name, args in self._records if name in PERSISTED]

    def replay(self, records: list[list]) -> None:
        """Send `records` (an earlier attempt's `pending`, from its checkpoint) before what
        this attempt logs; what the run has already is not logged again."""
        if self.active:
            with self._changed:
                self._records[:0] = [(n, tuple(a)) for n, a in records if n in PERSISTED]
                self._changed.notify_all()

    def send(self, records: list[list]) -> None:
        """Send `records` (an earlier attempt's `pending`) now, in this thread, through
        tracking's client (the driver's: it waits for the server as its block allows), taking
        each out of the list once it is stored: what the list holds when this raises was not
        sent. What the run has already is not logged again."""
        client = mlflow_client(self.uri)
        records[:] = [record for record in records if record[0] in PERSISTED]
        while records:
            count, name, args = next_request(records)
            getattr(self, name)(client, *args)
            del records[:count]

    def metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        values = {k: float(v) for k, v in values.items() if math.isfinite(float(v))}
        self._later("_log_metrics", values, step, now)

    def _new_metrics(self, client: Any, values: dict[str, float], step: int, now: int) -> list:
        """Those of `values` whose step the run has not got yet, as MLflow metrics."""
        from mlflow.entities import Metric

        batch = []
        for key, value in values.items():
            if key not in self._last_step:
                history = client.get_metric_history(self.run_id, key)
                self._last_step[key] = max((m.step for m in history), default=-1)
            if step > self._last_step[key]:
                batch.append(Metric(key, value, now, step))
        return batch

    def _send(self, client: Any, metrics: list, tags: dict[str, Any]) -> None:
        """One request: `metrics` and `tags` stored together, or not at all."""
        from mlflow.entities import RunTag

        if metrics or tags:
            client.log_batch(
                self.run_id,
                metrics=metrics,
                tags=[RunTag(k, str(v)) for k, v in tags.items()],
            )
        for m in metrics:  # (only once stored: a record tried again sends them again)
            self._last_step[m.key] = max(self._last_step[m.key], m.step)

    def _log_metric_records(self, client: Any, records: list[tuple]) -> None:
        """Records of `metrics` (values, step, time), in one request: what piled up while the
        server was away goes in a few requests, not one a record."""
        metrics, sent = [], {}
        for values, step, now in records:
            for m in self._new_metrics(client, values, step, now):
                if m.step > sent.get(m.key, -1):  # (a step once, whatever was replayed)
                    metrics.append(m)
                    sent[m.key] = m.step
        self._send(client, metrics, {})

    def tags(self, values: dict[str, str]) -> None:
        self._later("_log_tags", {k: str(v) for k, v in values.items()})

    def _log_tags(self, client: Any, values: dict[str, Any]) -> None:
        self._send(client, [], values)

    def text(self, text: str, artifact_file: str) -> None:
        """Store `text` as the run's artifact `artifact_file`."""
        self._later("_log_text", text, artifact_file)

    def _log_text(self, client: Any, text: str, artifact_file: str) -> None:
        client.log_text(self.run_id, text, artifact_file)

    def started(
        self, checkpoint_epoch: int | None, world: int, up_at: float, step: int = 0
    ) -> None:
        """This attempt's workers started their train function at `up_at`, `world` of them,
        from the checkpoint of `checkpoint_epoch` (None: from the start), after optimizer
        step `step`. A start after a checkpoint, or after an earlier attempt that trained (its
        first step is tagged), is a restart: counted and tagged with when, from where and on
        how many workers (the metric num_workers, one point per start, shows an elastic run's
        sizes), and the step it resumes after (`trainyard.resumed_step.<n>`)."""
        self._later("_record_start", checkpoint_epoch, world, time.time(), up_at, step)

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
        metrics = self._new_metrics(client, {"num_workers": world}, count, int(at * 1000))
        up = "resumed_workers_up_at" if self._restarted else "workers_up_at"
        said = {f"trainyard.{up}": f"{up_at:.3f}"}
        if not self._restarted:
            self._send(client, metrics, said)
            return
        after = checkpoint_epoch or 0
        was = tags.get("num_workers")  # (the earlier attempt's size, until this one tags its own)
        resized = f" (was {was})" if was and was != str(world) else ""
        when = f"after epoch {after} at {at:.3f} on {world} worker(s){resized}"
        said |= {
            "trainyard.restarts": count,
            f"trainyard.restart.{count}": when,
            f"trainyard.resumed_step.{count}": step,
        }
        metrics += self._new_metrics(
            client, {"restarted_after_epoch": after}, count, int(at * 1000)
        )
        self._send(client, metrics, said)  # (one request: a restart is counted once)
        log.info(
            f"restart {count}: resuming after step {step} (epoch {after} done) on {world} "
            f"worker(s){resized}"
        )

    def preempted(self, nodes: list[str], deadline: float | None, step: int) -> None:
        """A preemption notice for `nodes` (going at `deadline`, Unix time) was checkpointed at
        optimizer step `step`: tagged `trainyard.preempted.<n>` (n counts the run's notices)."""
        self._later("_log_preempted", list(nodes), deadline, step, time.time())

    def _log_preempted(
        self, client: Any, nodes: list[str], deadline: float | None, step: int, at: float
    ) -> None:
        tags = client.get_run(self.run_id).data.tags
        said = f"node {','.join(nodes)} deadline {f'{deadline:.3f}' if deadline else '-'} "
        said += f"step {step} at {at:.3f}"
        if said in tags.values():  # (sent before, by the attempt whose checkpoint kept it)
            return
        n = 1 + sum(k.startswith("trainyard.preempted.") for k in tags)
        self._send(client, [], {f"trainyard.preempted.{n}": said})

    def checks(self, asks: int, seconds: float) -> None:
        """What this attempt's preemption checks cost (training.preemption.PreemptionCheck)."""
        if asks:
            self._later("_log_tags", {"trainyard.preemption_checks": f"{asks} in {seconds:.3f} s"})

    def first_step(self, at: float) -> None:
        """This attempt's first optimizer step finished at `at` (a restart's: resumed_step_at)."""
        self._later("_log_first_step", at)

    def _log_first_step(self, client: Any, at: float) -> None:
        key = "resumed_step_at" if self._restarted else "first_step_at"
        self._send(client, [], {f"trainyard.{key}": f"{at:.3f}"})


log = logging.getLogger("trainyard")
MAX_METRICS = 1000
"""The most metrics MLflow takes in one request (log_batch)."""


def next_request(records: list) -> tuple[int, str, tuple]:
    """The request that sends the first of `records` ((method, arguments) pairs): how many
    records it sends, its method and arguments. Records of metrics in a row go together, up to
    MAX_METRICS."""
    name, args = records[0]
    if name != "_log_metrics":
        return 1, name, args
    taken, metrics = [], 0
    for name, args in records:
        if name != "_log_metrics" or (taken and metrics + len(args[0]) > MAX_METRICS):
            break
        taken.append(args)
        metrics += len(args[0])
    return len(taken), "_log_metric_records", (taken,)
