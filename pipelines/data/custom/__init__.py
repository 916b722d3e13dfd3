"""The custom pipeline: its spec part (spec), preparation (pipeline), logged model (serving)
and batch prediction (predict), registered by name in trainyard.pipelines.config.spec."""
