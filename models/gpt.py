"""A decoder-only transformer (GPT) in plain PyTorch: causal attention through
`scaled_dot_product_attention`, pre-LayerNorm blocks, a GELU MLP and tied input/output embeddings.

Sizes are named (`GPTConfig.sized("tiny", vocab_size=256)`); `flops_per_token` is the standard
estimate used for model FLOPs utilisation (MFU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from trainyard.models.outputs import sample


@dataclass
class GPTConfig:
    vocab_size: int
    """Tokens in the vocabulary (256 for bytes)."""
    context: int = 128
    """Longest sequence the model attends over (positions it has embeddings for)."""
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    """Model width; a multiple of n_head."""
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name}: expected an integer >= 1, got {self}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig: n_embd {self.n_embd} is not a multiple of n_head {self.n_head}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout: expected a number in [0, 1), got {self.dropout}")

    @classmethod
    def sized(cls, size: str, **overrides) -> GPTConfig:
        """The named size `size` (see SIZES) with `overrides` applied."""
        if size not in SIZES:
            raise ValueError(f"unknown GPT size {size!r}; known: {', '.join(SIZES)}")
        return replace(SIZES[size], **overrides)


# vocab_size is filled in from the tokenizer.
SIZES = {
    "tiny": GPTConfig(vocab_size=256, context=128, n_layer=4, n_head=4, n_embd=128),
    "small-cpu": GPTConfig(vocab_size=256, context=256, n_layer=6, n_head=6, n_embd=192),
    "gpt2-small": GPTConfig(vocab_size=256, context=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(vocab_size=256, context=1024, n_layer=24, n_head=16, n_embd=1024),
}


def matmul_params(config: GPTConfig) -> int:
    """Weights that take part in a matrix multiply per token: 12·d² per layer (q, k, v and
    output projections 4·d², MLP 8·d²) plus the output head V·d (tied to the token embedding).
    Position embeddings and LayerNorm gains are not multiplied."""
    d = config.n_embd
    return config.n_layer * 12 * d * d + config.vocab_size * d


def num_params(config: GPTConfig) -> int:
    """Parameters of `GPT(config)` (the tied head counted once)."""
    d = config.n_embd
    embeddings = (config.vocab_size + config.context) * d
    return embeddings + config.n_layer * (12 * d * d + 2 * d) + d


def flops_per_token(config: GPTConfig, context: int | None = None) -> int:
    """Training FLOPs per token (forward + backward): 6·N for the weight matmuls plus
    12·L·T·d for attention scores and values at sequence length T (the PaLM / nanoGPT
    estimate, which counts attention as if not causal)."""
    t = context or config.context
    return 6 * matmul_params(config) + 12 * config.n_layer * t * config.n_embd


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # (b, t, d) -> (b, heads, t, head_dim)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(b, t, d)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=False)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=False)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token ids (batch, time) in, next-token logits (batch, time, vocab) out."""

    _no_split_modules = ["Block"]  # its repeated blocks (what FSDP shards one at a time)

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.context, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=False)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled down by the depth they accumulate over.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.config.context:
            raise ValueError(
                f"sequence of {t} tokens; the model's context is {self.config.context}"
            )
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend `idx` (batch, time) by `max_new_tokens` sampled tokens (greedy when
        `temperature` is 0), attending over the last `context` tokens (models.outputs.sample)."""
        return sample(self, idx, max_new_tokens, self.config.context, temperature, top_k, generator)
