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
    """Call write(f) on a temp file in path's folder and move it into place.

    An OSError (disk full, permission denied) names `path` as its filename,
    whichever step raised it (a failed write names no file by itself)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; published files must be readable
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename in (None, tmp):
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        raise


def write_bytes(path: Path, data: bytes) -> None:
    write_with(path, lambda f: f.write(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


RENAME_EXCHANGE = 2  # linux/fs.h: renameat2 flag, swap the two names


def exchange(a: Path, b: Path) -> bool:
    """Swap the paths a and b (files or folders, both must exist) in one atomic step.

    For replacing a whole folder (the site): after `exchange(new, site)` the
    name `site` holds the new tree and `new` the old one, and at no moment is
    there no `site` (two renames leave a window where it is missing). Linux
    renameat2(RENAME_EXCHANGE) only; returns False, having changed nothing,
    where the OS or the file system cannot do it, so the caller falls back.
    """
    import ctypes
    import errno
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, musl builds without it)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(os.fspath(a)), at_fdcwd, os.fsencode(os.fspath(b)), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):  # unsupported here: nothing changed
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))
