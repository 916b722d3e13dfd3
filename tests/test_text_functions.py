"""The text pipeline's pure parts, without Ray: tokenizers, windows, the file split, the batch
stream that carries epochs across passes, and the training pieces transformers need."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainyard.cluster.errors import SpecError
from trainyard.cluster.hardware import peak_flops
from trainyard.pipelines.config.train import TrainSpec
from trainyard.pipelines.data.common import DataError, DataFacts
from trainyard.pipelines.data.text.pipeline import (
    count_tokens,
    encode_windows,
    is_validation,
    split_files,
    stdlib_files,
    token_dtype,
)
from trainyard.pipelines.data.tokenizers import ByteTokenizer, load_tokenizer
from trainyard.pipelines.training.feed import BatchStream
from trainyard.pipelines.training.metrics import throughput
from trainyard.pipelines.training.optim import lr_factor, make_optimizer
from trainyard.pipelines.training.step import task_loss, unwrap


class TwoBytesPerToken:
    """A user's tokenizer: pairs of bytes (a test of the plug-in interface)."""

    vocab_size = 65536

    def encode(self, data: bytes) -> np.ndarray:
        data = data + b"\0" * (len(data) % 2)
        return np.frombuffer(data, dtype=">u2").astype(np.uint16)

    def decode(self, ids) -> bytes:
        return np.asarray(ids, dtype=">u2").tobytes()


def test_bytes_round_trip_any_bytes_and_any_text():
    tok = ByteTokenizer()
    data = bytes(range(256)) + "déf λ(x): → ✓\n".encode()
    ids = tok.encode(data)
    assert ids.dtype == np.uint8 and len(ids) == len(data)
    assert tok.decode(ids) == data
    assert tok.decode(ids.tolist()) == data
    assert load_tokenizer("bytes").vocab_size == 256


def test_a_users_tokenizer_plugs_in_by_import_path():
    tok = load_tokenizer(f"{__name__}:TwoBytesPerToken")
    assert tok.decode(tok.encode(b"abcd")) == b"abcd"
    assert token_dtype(tok.vocab_size) == np.uint16
    out = encode_windows(
        {"bytes": np.array([b"abcdefgh" * 10], dtype=object)},
        f"{__name__}:TwoBytesPerToken",
        context=4,
        seed=0,
    )
    assert out["x"].dtype == np.uint16 and out["x"].shape[1] == 4
    with pytest.raises(SpecError, match="data.tokenizer: cannot import 'no_such_module:Tok'"):
        load_tokenizer("no_such_module:Tok")
    with pytest.raises(SpecError, match="expected module:attr"):
        load_tokenizer("sentencepiece")


def test_windows_are_shifted_by_one_cover_the_text_and_are_deterministic():
    files = [b"0123456789", b"abcdefghij", b"ABCDEFGHIJ"]
    batch = {"bytes": np.array(files, dtype=object)}
    out = encode_windows(batch, "bytes", context=4, seed=0)
    joined = b"".join(files)
    assert out["x"].shape == out["y"].shape == ((len(joined) - 1) // 4, 4)
    np.testing.assert_array_equal(out["x"][:, 1:], out["y"][:, :-1])
    # Every window is a stretch of the joined text, and together they cover it in order.
    windows = {bytes(x) + bytes(y[-1:]) for x, y in zip(out["x"], out["y"], strict=True)}
    expected = {joined[i : i + 5] for i in range(0, len(joined) - 4, 4)}
    assert windows == expected
    again = encode_windows(batch, "bytes", context=4, seed=0)
    np.testing.assert_array_equal(again["x"], out["x"])
    other = encode_windows(batch, "bytes", context=4, seed=1)
    assert not np.array_equal(other["x"], out["x"])  # shuffled, by the seed


def test_token_counts_per_block():
    y = np.array([[0, 1, 1], [255, 1, 0]], dtype=np.uint8)
    counts = count_tokens({"x": y, "y": y}, 256)["counts"]
    assert counts.shape == (1, 256) and counts[0, 1] == 3 and counts[0, 255] == 1


def test_file_split_is_by_path_deterministic_and_stable():
    files = [f"/data/dir/f{i:03d}.py" for i in range(400)]
    train, val = split_files("/data", files, 0.1, seed=0)
    assert sorted(train + val) == files and not set(train) & set(val)
    assert 20 <= len(val) <= 60
    assert split_files("/data", files, 0.1, seed=0) == (train, val)
    # A file's side depends on its own path alone: adding files or moving the root keeps it.
    train2, val2 = split_files("/data", files + ["/data/dir/new.py"], 0.1, seed=0)
    assert set(val) <= set(val2)
    assert split_files("/elsewhere", [f.replace("/data", "/elsewhere") for f in files], 0.1, 0)[
        1
    ] == [f.replace("/data", "/elsewhere") for f in val]
    assert is_validation("dir/f000.py", 0.1, 0) == ("/data/dir/f000.py" in val)


def test_two_files_always_split_and_one_file_is_refused():
    train, val = split_files("/d", ["/d/a.py", "/d/b.py"], 0.01, seed=0)
    assert len(train) == 1 and len(val) == 1
    with pytest.raises(DataError, match="at least 2"):
        split_files("/d", ["/d/a.py"], 0.1, seed=0)


def test_stdlib_corpus_is_the_library_without_its_tests():
    root, files = stdlib_files()
    assert len(files) > 300 and all(f.endswith(".py") for f in files)
    assert not any("/test/" in f[len(root) :] or "/site-packages/" in f for f in files)
    assert any(f.endswith("/json/decoder.py") for f in files)


def test_batch_stream_carries_epochs_across_passes_and_replays_from_a_position():
    def make_pass(n):
        return iter([(n, i) for i in range(5)])  # five batches per pass

    stream = BatchStream(make_pass)
    first = [next(stream) for _ in range(7)]
    assert first == [(1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (2, 0), (2, 1)]
    assert stream.position == (2, 2)
    rest = [next(stream) for _ in range(4)]
    resumed = BatchStream(make_pass, position=(2, 2))
    assert [next(resumed) for _ in range(4)] == rest == [(2, 2), (2, 3), (2, 4), (3, 0)]


def test_schedule_decays_to_its_floor():
    assert lr_factor(0, 100, 10, "cosine", 0.1) == pytest.approx(0.1)  # warm-up
    assert lr_factor(10, 100, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, "cosine", 0.1) == pytest.approx(0.55)


def test_weight_decay_only_on_matrices_and_embeddings():
    from trainyard.models.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=256, context=8, n_layer=1, n_head=1, n_embd=8))
    optimizer = make_optimizer(model, TrainSpec(weight_decay=0.1))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(
        p.dim() == 1 for p in plain["params"]
    )
    assert not optimizer.defaults["fused"]  # CPU parameters: the plain implementation
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )


def test_language_model_loss_is_per_token_cross_entropy():
    logits = torch.randn(2, 3, 5)
    y = torch.randint(0, 5, (2, 3))
    loss = task_loss("language_modeling")
    expected = torch.nn.functional.cross_entropy(logits.reshape(6, 5), y.reshape(6))
    torch.testing.assert_close(loss(logits, y), expected)
    torch.testing.assert_close(loss(logits, y, reduction="sum"), expected * 6)


def test_unwrap_sees_through_compile():
    net = torch.nn.Linear(2, 2)
    assert unwrap(torch.compile(net)) is net


def test_mfu_from_the_gpu_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("NVIDIA A10G") is None  # not in the table: no MFU rather than a wrong one
    assert peak_flops("AMD EPYC 7B13") is None

    class Epoch:
        samples_per_s = 10.0

    out = throughput(
        Epoch(), 2, DataFacts("language_modeling", context=1024, flops_per_token=6e8), 989e12
    )
    assert out["tokens_per_s"] == 20 * 1024
    assert math.isclose(out["mfu"], 20 * 1024 * 6e8 / (2 * 989e12))
    text = DataFacts("language_modeling", context=1024, flops_per_token=1)
    assert "mfu" not in throughput(Epoch(), 2, text, None)
