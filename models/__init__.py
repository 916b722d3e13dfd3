"""Pure PyTorch models: no Ray, DDP, AMP or MLflow here.

`MODELS` names the built-in models' builders: functions of plain keyword arguments that return
an `nn.Module`, the same contract as a user's `model.name: module:attr` (see config.user).
"""

from torch import nn

from trainyard.models.gpt import GPT, GPTConfig
from trainyard.models.mlp import MLP, MLPConfig, TabularPredictor
from trainyard.models.resnet import ResNet, ResNetConfig


def mlp(
    in_features: int, out_features: int, hidden: tuple[int, ...] = (128, 64), dropout: float = 0.1
) -> MLP:
    """The tabular MLP (`trainyard.models.mlp`)."""
    return MLP(MLPConfig(in_features, out_features, tuple(hidden), dropout))


def gpt(
    vocab_size: int,
    context: int = 128,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    dropout: float = 0.0,
) -> GPT:
    """The decoder-only transformer (`trainyard.models.gpt`)."""
    return GPT(GPTConfig(vocab_size, context, n_layer, n_head, n_embd, dropout))


def resnet(in_channels: int, num_classes: int, depth: int = 18, width: int = 64) -> ResNet:
    """The CIFAR-style ResNet (`trainyard.models.resnet`)."""
    return ResNet(ResNetConfig(in_channels, num_classes, depth, width))


MODELS = {"mlp": mlp, "gpt": gpt, "resnet": resnet}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the built-in model `name` from its keyword arguments."""
    return MODELS[name](**kwargs)


__all__ = [
    "GPT",
    "GPTConfig",
    "MLP",
    "MLPConfig",
    "MODELS",
    "ResNet",
    "ResNetConfig",
    "TabularPredictor",
    "build_model",
]
