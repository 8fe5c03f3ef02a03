"""Hub datasets are downloaded once per machine: the local main process (LOCAL_RANK 0) loads first, the other
processes of the launch wait for its marker and then read the HF datasets cache it filled.

The pattern is accelerate's `main_process_first`, done with a marker file in the HF datasets cache instead of
a barrier: it works before torch.distributed is started, and a failed load on the main process is reported
to the others (one line each) instead of leaving them at a barrier. docs/data.md#hub-datasets-on-several-processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from alignkit.errors import UserError

OK, FAILED = "ok", "failed"


def marker_path(key: str, cache_dir: str | Path | None = None) -> Path:
    """The marker of `key` (e.g. "hub id:config/split") for this launch: the ranks of one launch share their
    parent process (the accelerate / torchrun agent) and its run id, so a marker never outlives its launch."""
    import datasets

    launch = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.getppid()}"
    digest = hashlib.sha256(f"{key}\0{launch}".encode()).hexdigest()[:16]
    return Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / ".alignkit-main-first" / digest


@contextlib.contextmanager
def main_process_first(key: str, *, local_rank: int | None = None, world_size: int | None = None,
                       cache_dir: str | Path | None = None, poll_s: float = 0.2,
                       timeout_s: float | None = None) -> Iterator[None]:
    """Run the body on the local main process first, then on the others (they wait for its marker).

    One process: the body runs at once. Local rank 0 writes the marker when the body ends, `failed` when it
    raised; a waiting rank then stops with a UserError rather than download the data itself. There is no
    timeout by default: if the main process dies, the launcher ends the whole group."""
    if local_rank is None or world_size is None:
        from alignkit.launch import rank_info

        info = rank_info()
        local_rank = info["local_rank"] if local_rank is None else local_rank
        world_size = info["world_size"] if world_size is None else world_size
    if world_size <= 1:
        yield
        return
    marker = marker_path(key, cache_dir)
    if local_rank == 0:
        status = FAILED
        try:
            yield
            status = OK
        finally:
            marker.parent.mkdir(parents=True, exist_ok=True)
            tmp = marker.with_name(f".{marker.name}.{os.getpid()}")
            tmp.write_text(status)
            os.replace(tmp, marker)  # atomic: a waiting rank never reads half a marker
        return
    start = time.monotonic()
    while not marker.is_file():
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise UserError(f"{key}: the main process did not finish loading it within {timeout_s:g} s")
        time.sleep(poll_s)
    if marker.read_text().strip() != OK:
        raise UserError(f"{key}: the main process could not load it (its error is above)")
    yield
