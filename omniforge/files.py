"""Atomic writes: a folder or file is replaced by renames only, never left half-written.

A long run that dies mid-write leaves the previous version (plus a hidden `.NAME.tmp-PID`
beside it), so a checkpoint, an export or a pointer file is always either old or new.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty folder beside `target`; when the block ends without error it replaces
    `target` (an existing one is moved aside first, then deleted: it is absent only between two
    renames). On error the partial folder is deleted and `target` is untouched. A `target` that is
    a symbolic link is replaced by the new folder; what it pointed to is left as it was."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.is_symlink() or target.exists():  # a dangling link `exists()` not, and would block the rename
        target.rename(old)
    tmp.rename(target)
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace the file at `path` with `text` in one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
