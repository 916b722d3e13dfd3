"""Pure PyTorch models: no Ray, DDP, AMP or MLflow here."""

from models.mlp import MLP, MLPConfig, TabularPredictor

MODELS = {"mlp": (MLP, MLPConfig)}


def build_model(name: str, **config) -> "MLP":
    """Build model `name` from its config fields."""
    model_cls, config_cls = MODELS[name]
    return model_cls(config_cls(**config))


__all__ = ["MLP", "MLPConfig", "MODELS", "TabularPredictor", "build_model"]
