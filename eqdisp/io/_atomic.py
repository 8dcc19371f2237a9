"""Files written whole or not at all.

Every file eqdisp and its tools write in one piece (configs and summaries, latent shards and their
manifest, sampling state, sample grids, evaluation, analysis and benchmark reports, study results,
ledgers and pages) goes through `atomic_path`: it is written under a temporary name beside its
destination and renamed over it in one `os.replace`, so a reader, a crash or a SIGTERM sees the old
file or the new one, never a part. Two kinds do not: ``metrics.jsonl`` is appended a line at a time
(a resumed run drops a torn last line), and Orbax checkpoints have their own protocol
(`eqdisp.train._checkpoint`).
"""

import contextlib
import os
import pathlib
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A temporary path beside `path` to write into. On a clean exit it replaces `path`; on an
    error it is deleted and `path` is left as it was. The name is hidden and carries the process
    id, so writers in several processes never share one."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """`text` into `path` (UTF-8), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
