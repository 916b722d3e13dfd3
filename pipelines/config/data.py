"""What the pipelines' data parts share (each pipeline's is in its package:
`trainyard.pipelines.data.<pipeline>.spec`), and the preprocessing cache's part."""

from __future__ import annotations

from dataclasses import dataclass

from trainyard.cluster.errors import check as _check

IN_MEMORY_MAX_MB = 512.0
"""data.in_memory_max_mb's default (every pipeline's)."""
SHUFFLE_WINDOW_MB = 64.0
"""data.shuffle_window_mb's default: about one block (the pipelines write blocks of about
64 MB), several where blocks are small."""


@dataclass
class CacheSpec:
    """The preprocessing cache (trainyard.pipelines.data.cache): prepared datasets written once
    and read again by every run of the same data."""

    enabled: bool = True
    """Read and fill the cache (tabular, text and images; a custom dataset is never cached:
    what its code reads is not known to trainyard)."""
    path: str | None = None
    """Where entries go: a directory or URI every node sees. None: `cache` under
    scaling.storage_path (the checkpoints' place)."""
    max_gb: float = 20.0
    """The entries together take at most this much; the oldest go first."""

    def __post_init__(self) -> None:
        _check(isinstance(self.enabled, bool), "cache.enabled", self.enabled, "true or false")
        _check(
            isinstance(self.max_gb, int | float) and self.max_gb >= 0,
            "cache.max_gb",
            self.max_gb,
            "a number of GB >= 0",
        )
