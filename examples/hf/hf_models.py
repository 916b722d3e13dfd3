"""Hugging Face `transformers` models as trainyard takes them: factories that build each model
from its config (nothing is downloaded) and return it as it comes, no wrapper module.

trainyard passes each factory the facts of its pipeline that it names (images: `in_channels`,
`num_classes`; text: `vocab_size`, `context`), then the spec's `model.args`. The models return
`ModelOutput`s; trainyard reads their `logits` for the loss, the metrics, predictions and
sampling.
"""

from transformers import GPT2Config, GPT2LMHeadModel, ResNetConfig, ResNetForImageClassification


def resnet(in_channels: int, num_classes: int, width: int = 16, depths: tuple = (1, 1)):
    """A small `ResNetForImageClassification`: `len(depths)` stages of basic blocks."""
    config = ResNetConfig(
        num_channels=in_channels,
        embedding_size=width,
        hidden_sizes=[width * 2**i for i in range(len(depths))],
        depths=list(depths),
        layer_type="basic",
        num_labels=num_classes,
    )
    return ResNetForImageClassification(config)


def gpt2(vocab_size: int, context: int, n_layer: int = 2, n_head: int = 2, n_embd: int = 64):
    """A small `GPT2LMHeadModel` over trainyard's tokenizer's vocabulary and context."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=context,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=None,  # (GPT-2's own ids are outside a byte-level vocabulary)
        eos_token_id=None,
        use_cache=False,  # training reads the logits only: no key/value cache to build
    )
    return GPT2LMHeadModel(config)
