"""Where media bytes come from: a path (checked, opened lazily) or bytes already in memory."""

from __future__ import annotations

import io
from pathlib import Path

from omniforge.errors import EmptyMediaError, UnreadableMediaError


def media_source(source, kind: str) -> io.BytesIO | str:
    """A readable stream for `source`: bytes are wrapped, a path is checked and returned as str.

    Paths are not read into memory, so decoders can seek in large files. Raises
    `UnreadableMediaError` (missing, not a file, no permission) or `EmptyMediaError` (0 bytes).
    """
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise EmptyMediaError(source, f"empty {kind} data (0 bytes)")
        return io.BytesIO(source)
    path = Path(source)
    try:
        if not path.is_file():
            raise UnreadableMediaError(source, f"cannot read {kind} file (no such file)")
        with path.open("rb") as f:
            empty = not f.read(1)
    except OSError as e:
        raise UnreadableMediaError(source, f"cannot read {kind} file ({e.strerror or e})") from None
    if empty:
        raise EmptyMediaError(source, f"empty {kind} file (0 bytes)")
    return str(path)
