"""The driver's side of the Ray boundary: the run's recipe (run: spec → datasets →
TorchTrainer → result), what the run records (record), where it starts and continues
(session, resume, startup), the checks before any worker starts (checks), and the trainer
(trainer). What runs in the workers is trainyard.pipelines.training, which never imports this."""
