"""Text with Ray Data: list files, split them train/validation, encode, cut windows, stream.

The split is by file, decided on the driver from a hash of each file's path, so no window ever
holds bytes of both sides. Ray Data reads the files, `encode_windows` (a pure batch function)
tokenizes a block of files and cuts it into shuffled fixed-length windows, and the workers
stream their shards of those windows. The tokenizer is pluggable: `bytes`, or any importable
class with the `Tokenizer` interface.
"""

from __future__ import annotations

import math
import sysconfig
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from trainyard.pipelines.config.model import GPTSpec
from trainyard.pipelines.config.spec import RunSpec
from trainyard.pipelines.data.arrays import derive_seed
from trainyard.pipelines.data.common import (
    DataError,
    DataFacts,
    Prepared,
    code_digest,
    fingerprint,
    in_random_order,
    resolve_files,
)
from trainyard.pipelines.data.split import below, key_hashes
from trainyard.pipelines.data.text.spec import TextDataSpec
from trainyard.pipelines.data.tokenizers import ByteTokenizer, load_tokenizer

BUILTIN_STDLIB = "builtin:python-stdlib"
# CPython's own test suite (17 of the 31 MB in 3.11) is left out: the corpus is the library.
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
BLOCK_BYTES = 4 * 1024**2
"""Text per read task: few enough tasks for small corpora, enough parallelism for big ones."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    return np.dtype(
        np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32
    )


# --- pure batch functions (run inside Ray Data tasks) ------------------------------------------


def encode_windows(
    batch: dict[str, np.ndarray], tokenizer: str, context: int, seed: int
) -> dict[str, np.ndarray]:
    """A block of files ({"bytes": file contents}) → shuffled training windows.

    The files are encoded and joined end to end, then cut every `context` tokens into windows
    of `context + 1`: "x" is a window's first `context` tokens, "y" the same shifted by one
    (the next token at every position). The tail shorter than a window is dropped. The order
    of the windows is shuffled by a seed and the block's content, the same on every run.
    """
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    tokens = np.concatenate(
        [np.asarray(tok.encode(bytes(b)), dtype=dtype) for b in batch["bytes"]]
        or [np.zeros(0, dtype)]
    )
    n = max(0, (len(tokens) - 1) // context)
    starts = np.arange(n) * context
    windows = tokens[starts[:, None] + np.arange(context + 1)]
    block = zlib.crc32(tokens[: 1 << 20].tobytes())
    rng = np.random.default_rng(derive_seed(seed, "windows", block, len(tokens)))
    windows = windows[rng.permutation(n)]
    return {"x": windows[:, :-1], "y": windows[:, 1:]}


def count_tokens(batch: dict[str, np.ndarray], vocab_size: int) -> dict[str, np.ndarray]:
    """How often each token id occurs as a target in a block of windows (one row per block)."""
    counts = np.bincount(batch["y"].reshape(-1).astype(np.int64), minlength=vocab_size)
    return {"counts": counts[None, :]}


# --- driver side --------------------------------------------------------------------------------


def stdlib_files() -> tuple[str, list[str]]:
    """The root and the `.py` files of the running Python's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        str(f)
        for f in root.rglob("*.py")
        if not STDLIB_SKIP & set(f.relative_to(root).parts[:-1]) and f.is_file()
    ]
    return str(root), sorted(files)


def list_files(spec: TextDataSpec) -> tuple[str, list[str], pafs.FileSystem]:
    """The data root (what split hashes are relative to), the files and their file system."""
    if spec.path == BUILTIN_STDLIB:
        root, files = stdlib_files()
        return root, files, pafs.LocalFileSystem()
    if spec.path.startswith("builtin:"):
        raise DataError(
            f"data.path: unknown built-in corpus {spec.path!r}; available: {BUILTIN_STDLIB}"
        )
    files, fs = resolve_files(spec.path)
    root = files[0].rsplit("/", 1)[0] if len(files) == 1 else _common_dir(files)
    return root, files, fs


def local_files(spec: RunSpec) -> list[str]:
    """The text files on a local disk (none for URIs)."""
    _, files, fs = list_files(spec.data)
    return files if isinstance(fs, pafs.LocalFileSystem) else []


def _common_dir(files: list[str]) -> str:
    parts = [f.split("/")[:-1] for f in files]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return "/".join(common)


def is_validation(relative_path: str, fraction: float, seed: int) -> bool:
    """Whether a file goes to validation: a hash of its path below the root, so the answer
    never depends on which other files exist or on the machine."""
    return bool(below(key_hashes([relative_path], seed), fraction)[0])


def split_files(
    root: str, files: list[str], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Train and validation files, each side non-empty."""
    if len(files) < 2:
        raise DataError(
            f"data.path: {len(files)} file(s); the text pipeline splits train/validation by "
            "file and needs at least 2"
        )
    hashes = key_hashes([f[len(root) :].lstrip("/") for f in files], seed)
    flags = below(hashes, fraction)
    if flags.all() or not flags.any():
        # Too few files for the fraction to pick any (or to leave any): hold out the one
        # whose hash is smallest, still decided by the hashes alone.
        flags = np.arange(len(files)) == np.argmin(hashes)
    train = [f for f, v in zip(files, flags, strict=True) if not v]
    val = [f for f, v in zip(files, flags, strict=True) if v]
    return train, val


@dataclass
class TextData:
    train: Any
    """ray.data.Dataset of {"x": tokens[context], "y": the next tokens[context]} windows."""
    validation: Any
    num_train: int
    num_validation: int
    vocab_size: int
    unigram_entropy: float
    """Entropy of the training tokens' frequencies in nats: the loss of a model that predicts
    every token from its frequency alone, the bar that learning is measured against."""
    tokens_per_byte: float
    train_files: int
    validation_files: int
    train_bytes: int


def build_datasets(
    spec: RunSpec,
    task_cpus: float,
    num_workers: int,
    rows_per_step: int,
    read_args: dict[str, Any] | None = None,
) -> TextData:
    """List and split the files on the driver, then read, encode and window them with Ray Data;
    return the windows of both sides, kept in the object store (the encoding is done once,
    not again in every epoch)."""
    import ray.data

    data, seed, context = spec.data, spec.train.seed, spec.context
    tokenizer = load_tokenizer(data.tokenizer)
    root, files, fs = list_files(data)
    train_files, val_files = split_files(root, files, data.validation_fraction, seed)
    sizes = {i.path: i.size for i in fs.get_file_info(files)}
    kwargs = {"tokenizer": data.tokenizer, "context": context, "seed": seed}

    def windows(paths: list[str]) -> Any:
        total = sum(sizes[p] for p in paths)
        blocks = min(len(paths), max(num_workers, math.ceil(total / BLOCK_BYTES)))
        return (
            ray.data.read_binary_files(
                paths,
                filesystem=fs,
                override_num_blocks=blocks,
                num_cpus=task_cpus,
                ray_remote_args=read_args or {},
            )
            .map_batches(encode_windows, fn_kwargs=kwargs, batch_size=None, num_cpus=task_cpus)
            .materialize()
        )

    train, validation = windows(train_files), windows(val_files)
    # A file's windows are alike (and each block holds a few files): the training windows
    # in a random order once, so that every block is a sample of all the text.
    train = in_random_order(train, seed, train.num_blocks(), task_cpus)
    num_train, num_val = train.count(), validation.count()
    if data.validation_windows is not None and num_val > data.validation_windows:
        validation = validation.limit(data.validation_windows).materialize()
        num_val = data.validation_windows
    if num_train // num_workers < rows_per_step:
        raise DataError(
            f"data: {num_train} training windows of {context} tokens give each of "
            f"{num_workers} worker(s) fewer than one optimizer step ({rows_per_step} windows "
            "each); lower the batch, the context, or use more text"
        )
    if num_val < num_workers:
        raise DataError(
            f"data: {num_val} validation windows of {context} tokens for {num_workers} "
            "worker(s); raise data.validation_fraction or use more text"
        )
    counts = sum(
        row["counts"]
        for row in train.map_batches(
            count_tokens,
            fn_kwargs={"vocab_size": tokenizer.vocab_size},
            batch_size=None,
            num_cpus=task_cpus,
        ).take_all()
    )
    p = counts[counts > 0] / counts.sum()
    train_bytes = sum(sizes[f] for f in train_files)
    return TextData(
        train=train,
        validation=validation,
        num_train=num_train,
        num_validation=num_val,
        vocab_size=tokenizer.vocab_size,
        unigram_entropy=float(-(p * np.log(p)).sum()),
        # Exact for bytes; for other tokenizers the windows' tokens over the files' bytes.
        tokens_per_byte=1.0
        if isinstance(tokenizer, ByteTokenizer)
        else float(counts.sum()) / max(train_bytes, 1),
        train_files=len(train_files),
        validation_files=len(val_files),
        train_bytes=train_bytes,
    )


def prepare(
    spec: RunSpec,
    task_cpus: float,
    num_workers: int,
    rows_per_step: int,
    read_args: dict[str, Any] | None = None,
) -> Prepared:
    """The text pipeline's windows and facts for training (the vocabulary and context; for the
    built-in GPT, FLOPs per token for MFU; the unigram entropy that the validation loss is
    printed beside)."""
    from trainyard.models.gpt import flops_per_token, num_params  # noqa: PLC0415 (torch: not on the command's start)

    data = build_datasets(spec, task_cpus, num_workers, rows_per_step, read_args)
    print(
        f"trainyard: text: {data.train_files} + {data.validation_files} files "
        f"({data.train_bytes / 1e6:.1f} MB to train on), {data.num_train} + "
        f"{data.num_validation} windows of {spec.context} tokens; unigram entropy "
        f"{data.unigram_entropy:.3f} nats/token"
    )
    model_facts: dict[str, Any] = {}
    if isinstance(spec.model, GPTSpec):
        config = spec.model.config(data.vocab_size)
        model_facts = {
            "flops_per_token": flops_per_token(config),
            "model.flops_per_token": flops_per_token(config),
            "model.parameters": num_params(config),
        }
    return Prepared(
        train=data.train,
        validation=data.validation,
        num_train=data.num_train,
        num_validation=data.num_validation,
        facts={"vocab_size": data.vocab_size, "context": spec.context},
        data_facts=DataFacts(
            task="language_modeling",
            dtypes={"x": "int64", "y": "int64"},
            context=spec.context,
            unigram_entropy=data.unigram_entropy,
            tokens_per_byte=data.tokens_per_byte,
            flops_per_token=model_facts.get("flops_per_token"),
        ),
        params={
            "data.num_train_windows": data.num_train,
            "data.num_validation_windows": data.num_validation,
            "data.train_files": data.train_files,
            "data.validation_files": data.validation_files,
            "data.train_bytes": data.train_bytes,
            "data.unigram_entropy": round(data.unigram_entropy, 5),
        }
        | {k: v for k, v in model_facts.items() if k.startswith("model.")},
    )


def package(spec: RunSpec, prepared: Prepared, net: Any) -> tuple[Any, Any, dict[str, str]]:
    """The trained GPT with its tokenizer (it scores texts: serving.TextModel), an
    input example and its MLflow metadata, which names the tokenizer."""
    from trainyard.models.outputs import targets_keyword  # noqa: PLC0415 (torch: not on the command's start)
    from trainyard.pipelines.data.text.serving import TextModel  # noqa: PLC0415 (torch, MLflow: not on the command's start)

    own = spec.train.loss == "model"  # (scored with its own loss where its logits fall short)
    targets = targets_keyword(net, getattr(spec.model, "targets_arg", None)) if own else None
    model = TextModel(net, load_tokenizer(spec.data.tokenizer), spec.context, targets)
    example = pd.DataFrame({"text": ["def main():\n    return 0\n", "import os\n"]})
    metadata = {"pipeline": "text", "tokenizer": spec.data.tokenizer, "context": spec.context}
    if targets:
        metadata["targets_arg"] = targets
    return model, example, metadata


def describe_data(spec: RunSpec) -> None:
    """Nothing beyond the spec."""
    return None


def cache_inputs(spec: RunSpec) -> dict[str, Any]:
    """The data spec, the seed, the context, the model (its FLOPs per token are facts of the
    prepared data), the files' fingerprint and the tokenizer's code."""
    _, files, fs = list_files(spec.data)
    return {
        "pipeline": "text",
        "data": asdict(spec.data),
        "seed": spec.train.seed,
        "context": spec.context,
        "model": asdict(spec.model),
        "files": fingerprint(files, fs),
        "code": code_digest([spec.data.tokenizer]),
    }


def model_facts(spec: RunSpec) -> dict[str, Any]:
    """The tokenizer's vocabulary and the context: all the built-in GPT needs."""
    return {"vocab_size": load_tokenizer(spec.data.tokenizer).vocab_size, "context": spec.context}


def metric_keys(spec: RunSpec) -> list[str]:
    """The metrics plotted into the run's curves."""
    return ["train_loss", "val_loss", "val_bits_per_byte", "tokens_per_s"]


def figures(spec: RunSpec, prepared: Prepared, net: Any, directory: Any) -> list[Any]:
    """None beyond the curves (samples of generated text are `trainyard generate`'s)."""
    return []
