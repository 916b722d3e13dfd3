"""The preprocessing cache on the local 3-node cluster, with the tabular pipeline's real
preparation of a mixed table (its fitted encoder travels in the entry): a hit skips the
preprocessing and gives the same blocks; a touched file or a changed setting misses; only an
entry whose signed manifest is there is read; racing writers leave one entry; the size bound
evicts the oldest; `cache.enabled: false` turns it off."""

from __future__ import annotations

import os
import runpy
import threading
from pathlib import Path

import numpy as np
import pytest

from trainyard.pipelines.config.spec import load_spec
from trainyard.pipelines.data import cache
from trainyard.pipelines.data.features import encode
from trainyard.pipelines.data.tabular import pipeline as tabular

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def table(ray_cluster, tmp_path_factory) -> Path:
    from trainyard.pipelines.driver.session import init_ray

    init_ray()  # (the driver's Ray Data settings: ordered blocks)
    path = tmp_path_factory.mktemp("cache-data") / "churn.parquet"
    churn = runpy.run_path(str(ROOT / "examples" / "churn.py"))
    churn["table"](n=1200).astype({"autopay": "boolean"}).to_parquet(path, index=False)
    return path


def spec_for(table: Path, *overrides: str):
    return load_spec(ROOT / "configs" / "churn.yaml", [f"data.path={table}", *overrides])


def prepare(spec, root: Path):
    return cache.prepare(tabular, spec, str(root), 0.5, 2, 8, None)


def blocks(ds) -> list[dict[str, np.ndarray]]:
    return list(ds.iter_batches(batch_size=None, batch_format="numpy"))


def manifest_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.json"))


def test_a_hit_skips_preprocessing_and_gives_the_same_blocks(table, tmp_path, capsys, monkeypatch):
    spec = spec_for(table)
    first, filled = prepare(spec, tmp_path)
    assert filled.what == "filled" and "written to" in capsys.readouterr().out
    second, hit = prepare(spec, tmp_path)  # (small: read by the driver)
    assert (hit.what, hit.key) == ("hit", filled.key)
    assert "preprocessing skipped" in capsys.readouterr().out
    assert hit.tags() == {"trainyard.data_cache": f"hit {filled.key}"}
    monkeypatch.setattr(cache, "READ_HERE_BYTES", 0)
    third, _ = prepare(spec, tmp_path)  # (read by tasks on the cluster, as a large entry is)
    for fresh, *cached in (
        (first.train, second.train, third.train),
        (first.validation, second.validation, third.validation),
    ):
        a = blocks(fresh)
        for b in map(blocks, cached):
            assert [len(x["y"]) for x in a] == [len(x["y"]) for x in b] and len(a) >= 2
            for x, y in zip(a, b, strict=True):
                assert np.array_equal(x["x"], y["x"]) and np.array_equal(x["y"], y["y"])
    assert second.per_epoch is None and second.params == first.params
    assert (second.num_train, second.num_validation) == (first.num_train, first.num_validation)
    assert second.facts == first.facts and second.data_facts == first.data_facts
    # The fitted encoder came back: raw rows encode as they did.
    was, now = first.extra, second.extra
    raw = was.example.astype({c: np.float64 for c in was.plan.numeric})
    assert np.array_equal(
        encode(raw, now.stats.encoder, now.stats.features),
        encode(raw, was.stats.encoder, was.stats.features),
    )

    # A touched input file, or a changed setting, is another entry.
    stat = table.stat()
    os.utime(table, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    _, touched = prepare(spec, tmp_path)
    _, changed = prepare(spec_for(table, "data.max_onehot=8"), tmp_path)
    assert touched.what == changed.what == "filled"
    assert len({filled.key, touched.key, changed.key}) == 3
    assert len(manifest_files(tmp_path)) == 3

    # Off: nothing read or written.
    _, off = prepare(spec_for(table, "cache.enabled=false"), tmp_path)
    assert off.what == "off" and len(manifest_files(tmp_path)) == 3


def test_only_a_complete_signed_entry_is_read(table, tmp_path, capsys):
    spec = spec_for(table)
    _, filled = prepare(spec, tmp_path)
    (manifest,) = manifest_files(tmp_path)
    # A crash before the manifest: the blocks and state are there, the manifest is not.
    manifest.unlink()
    data, again = prepare(spec, tmp_path)
    assert again.what == "filled" and data.num_train > 0
    # A manifest changed by anyone without the model key (here: the row count) is not read;
    # the copy written instead is.
    (manifest,) = manifest_files(tmp_path)
    manifest.write_text(manifest.read_text().replace('"num_train": ', '"num_train": 1'))
    capsys.readouterr()
    _, refused = prepare(spec, tmp_path)
    assert "1 cop(ies) of entry" in capsys.readouterr().out and refused.what == "filled"
    _, hit = prepare(spec, tmp_path)
    assert hit.what == "hit" and len(manifest_files(tmp_path)) == 2


def test_racing_writers_both_succeed_with_one_entry(table, tmp_path):
    spec = spec_for(table)
    data = tabular.prepare(spec, 0.5, 2, 8)
    inputs = tabular.cache_inputs(spec)
    key = cache.key_of(inputs, 2)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            cache.store(str(tmp_path), key, data, inputs)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    writers = [threading.Thread(target=write) for _ in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert not errors
    (entry,) = cache.entries(str(tmp_path))
    assert [p.name for p in (tmp_path / key).iterdir() if p.is_dir()] == [entry["writer"]]
    assert cache.load(str(tmp_path), key, entry).num_train == data.num_train


def test_the_size_bound_evicts_the_oldest_entries(table, tmp_path):
    keys = [prepare(spec_for(table, f"train.seed={seed}"), tmp_path)[1].key for seed in (0, 1)]
    assert [m["key"] for m in cache.entries(str(tmp_path))] == keys
    # A third entry under a bound that holds one: the two before it go, it stays.
    _, third = prepare(spec_for(table, "train.seed=2", "cache.max_gb=0.000001"), tmp_path)
    assert [m["key"] for m in cache.entries(str(tmp_path))] == [third.key]
    assert sorted(p.name for p in tmp_path.iterdir()) == [third.key]


def test_one_changed_byte_changes_the_key_that_digests_a_runs_inputs(tmp_path):
    """The key is also the digest of a run's logged inputs (where the cache is off too):
    a byte changed in place (same size) gives another."""
    path = tmp_path / "t.csv"
    path.write_text("a,b,label\n1,2,yes\n3,4,no\n")
    spec = load_spec(ROOT / "configs" / "churn.yaml", [f"data.path={path}", "data.label=label"])
    before = cache.key_of(tabular.cache_inputs(spec), 2)
    assert cache.key_of(tabular.cache_inputs(spec), 2) == before
    path.write_text("a,b,label\n1,3,yes\n3,4,no\n")
    assert cache.key_of(tabular.cache_inputs(spec), 2) != before
