"""The training core: the driver (spec -> datasets -> TorchTrainer -> MLflow run -> summary)
and the per-worker loop (step, evaluation, checkpoints, watchdog, metrics)."""
