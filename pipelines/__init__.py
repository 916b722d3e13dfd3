"""The training application: run spec, data pipelines, training loop, tracking, CLI."""
