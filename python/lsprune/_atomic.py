"""Atomic file writes shared by every writer of lsprune (statistics, checkpoints, saved models, the CLI).

A file is written under a hidden temporary name in its target folder and renamed onto the target, so
an interrupted or failed write leaves the previous file (or none) and no temporary file. The
temporary file gets the mode a plain ``open(path, "w")`` would give (``0o666 & ~umask``):
``tempfile.mkstemp`` creates ``0o600`` files (and ``mkdtemp`` ``0o700`` folders) whatever the umask.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from typing import Callable

PREFIX = ".lsprune-"
_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask. Python can only read it by setting it; it is restored at once (the lock keeps
    two lsprune writers from racing on it)."""
    with _umask_lock:
        old = os.umask(0o077)
        os.umask(old)
    return old


def plain_mode(path: str) -> None:
    """Gives a file the mode ``open()`` would have: ``0o666 & ~umask``."""
    os.chmod(path, 0o666 & ~current_umask())


def new_temp(folder: str, suffix: str = ".tmp") -> str:
    """An empty file with a hidden temporary name in ``folder``, mode ``0o666 & ~umask``."""
    fd, tmp = tempfile.mkstemp(prefix=PREFIX, suffix=suffix, dir=folder)
    os.close(fd)
    try:
        plain_mode(tmp)
    except BaseException:
        remove_quietly(tmp)
        raise
    return tmp


def new_temp_dir(folder: str) -> str:
    """An empty folder with a hidden temporary name in ``folder``, mode ``0o777 & ~umask``."""
    tmp = tempfile.mkdtemp(prefix=PREFIX, suffix=".tmp", dir=folder)
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def remove_quietly(path: str) -> None:
    """Removes a temporary file if it exists (cleanup must not mask the error being handled)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[str], None], *, fsync: bool = True) -> None:
    """``write(tmp)`` fills a temporary file next to ``path``, which is then renamed onto ``path``
    (synced to disk first when ``fsync``)."""
    path = os.fspath(path)
    tmp = new_temp(os.path.dirname(os.path.abspath(path)))
    try:
        write(tmp)
        plain_mode(tmp)  # again: some writers (safetensors) replace the file they are given
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def sha256_file(path) -> str:
    """Hex SHA-256 of a file, read in 16 MiB chunks (checkpoints and saved models record them)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(16 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
