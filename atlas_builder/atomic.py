"""All-or-nothing file writes: write a temp file beside the target, then os.replace.

Every file the builder writes (weights cache, media, site pages) goes through
here, so a crash leaves either the old file or the new one, never half of one.
Does not decide what to write or where.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

UMASK = os.umask(0)
os.umask(UMASK)


def write_with(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(f) on a temp file in path's folder and move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; published files must be readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    write_with(path, lambda f: f.write(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))
