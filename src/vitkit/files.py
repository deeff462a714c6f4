"""Files written whole or not at all."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | Path, sync: bool = False, before=None):
    """A temporary name beside `path` to write to; when the block ends without an error the file replaces `path`
    (on disk first when `sync`; `before()` runs just before it does), otherwise it is removed. Readers and crashes
    never meet half a file, and the earlier file at `path` stays whole until the new one is complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name[:200]}.{os.getpid()}.tmp")  # within the 255 bytes a name may have
    try:
        yield tmp
        if sync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if before is not None:
            before()
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the folder went away or became read-only: nothing more to clean
            pass
