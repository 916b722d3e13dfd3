"""Pure PyTorch models: no Ray, DDP, AMP or MLflow here."""

from torch import nn

from models.gpt import GPT, GPTConfig
from models.mlp import MLP, MLPConfig, TabularPredictor

MODELS = {"mlp": (MLP, MLPConfig), "gpt": (GPT, GPTConfig)}


def build_model(name: str, **config) -> nn.Module:
    """Build model `name` from its config fields."""
    model_cls, config_cls = MODELS[name]
    return model_cls(config_cls(**config))


__all__ = ["GPT", "GPTConfig", "MLP", "MLPConfig", "MODELS", "TabularPredictor", "build_model"]
