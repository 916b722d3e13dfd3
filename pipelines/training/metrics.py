"""What an epoch reports besides its losses: throughput (samples, images or tokens per second,
MFU), language-model metrics, and the progress line rank 0 prints."""

from __future__ import annotations

from trainyard.pipelines.data.common import DataFacts
from trainyard.pipelines.data.tokenizers import bits_per_byte
from trainyard.pipelines.training.step import EpochStats


def throughput(
    result: EpochStats, world: int, data: DataFacts, peak: float | None
) -> dict[str, float]:
    """samples/s over all ranks; for text also tokens/s, and model FLOPs utilisation where the
    device's peak is known (achieved model FLOP/s over the peak of all `world` devices)."""
    out = {"samples_per_s": result.samples_per_s * world}
    if data.unit:  # images/s
        out[f"{data.unit}_per_s"] = out["samples_per_s"]
    if data.context:
        out["tokens_per_s"] = out["samples_per_s"] * data.context
        if peak and data.flops_per_token:
            out["mfu"] = out["tokens_per_s"] * data.flops_per_token / (peak * world)
    return out


def text_metrics(metrics: dict[str, float], data: DataFacts) -> dict[str, float]:
    """Validation loss in bits per byte and as a share of the corpus' unigram entropy."""
    if not data.unigram_entropy:
        return {}
    loss = metrics["val_loss"]
    return {
        "val_bits_per_byte": bits_per_byte(loss, data.tokens_per_byte),
        "val_loss_vs_unigram": loss / data.unigram_entropy,
    }


def progress_line(epoch: int, epochs: int, metrics: dict[str, float], data: DataFacts) -> str:
    """One line per epoch: losses, validation metrics, throughput, data wait."""
    line = f"epoch {epoch}/{epochs}  train_loss {metrics['train_loss']:.4f}"
    if "val_loss_vs_unigram" in metrics:
        line += (
            f"  val_loss {metrics['val_loss']:.4f} nats"
            f" ({metrics['val_bits_per_byte']:.3f} bits/byte,"
            f" {metrics['val_loss_vs_unigram']:.2f}× unigram entropy"
            f" {data.unigram_entropy:.2f})"
            f"  tokens/s {metrics['tokens_per_s']:.0f}"
        )
        if "mfu" in metrics:
            line += f"  MFU {100 * metrics['mfu']:.1f}%"
        text = ("val_loss", "val_bits_per_byte", "val_loss_vs_unigram")
        shown = {k: v for k, v in metrics.items() if k.startswith("val_") and k not in text}
        line += "".join(f"  {k} {v:.4f}" for k, v in shown.items())
    else:
        shown = {k: v for k, v in metrics.items() if k.startswith("val_")}
        line += "  " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items())
        unit = data.unit or "samples"
        line += f"  {unit}/s {metrics['samples_per_s']:.0f}"
    return (
        line + f"  data_wait {100 * metrics['data_wait_share']:.1f}%"
        f"  ({metrics['epoch_seconds']:.2f} s, {metrics['elapsed_s']:.0f} s in all)"
    )


def stop_message(nonfinite_steps: int, epoch: int) -> str:
    """Why a run stopped itself: its loss stayed NaN/inf."""
    return (
        f"the training loss was NaN/inf for {nonfinite_steps} steps in a row "
        f"(train.max_nonfinite_steps) in epoch {epoch}; lower train.lr, turn on "
        "train.grad_clip, or check the data for NaN/inf values"
    )
