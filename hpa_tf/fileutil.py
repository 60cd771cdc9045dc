"""Write-then-rename helpers: a killed run never leaves a half-written file under its final name.

Paths with a URL scheme (``gs://…``) go through ``tf.io.gfile`` (imported lazily); local paths
use the standard library.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator


def is_remote(path: str | os.PathLike) -> bool:
    """True for ``scheme://`` paths that only tf.io.gfile can write."""
    return "://" in str(path)


def _gfile():
    import tensorflow as tf  # lazy: keeps light modules free of TensorFlow

    return tf.io.gfile


def exists(path: str | os.PathLike) -> bool:
    return _gfile().exists(str(path)) if is_remote(path) else os.path.exists(path)


def makedirs(path: str | os.PathLike) -> None:
    if is_remote(path):
        _gfile().makedirs(str(path))
    else:
        os.makedirs(path, exist_ok=True)


def join(base: str | os.PathLike, *parts: str) -> str:
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return os.path.join(base, *parts)


def temp_name(path: str | os.PathLike) -> str:
    """A sibling name for ``path`` that no finished file uses (``.tmp-…`` infix)."""
    path = str(path)
    head, _, tail = path.rpartition("/")
    return f"{head}/.tmp-{uuid.uuid4().hex[:8]}-{tail}" if head else f".tmp-{uuid.uuid4().hex[:8]}-{tail}"


def rename(src: str, dst: str) -> None:
    if is_remote(dst):
        _gfile().rename(src, dst, overwrite=True)
    else:
        os.replace(src, dst)


def remove(path: str) -> None:
    if is_remote(path):
        if _gfile().exists(path):
            _gfile().remove(path)
    elif os.path.exists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    tmp = temp_name(path)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError, Exception):
            remove(tmp)
        raise
    rename(tmp, str(path))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs):
    """Open a temporary file for writing; it becomes ``path`` only when the block succeeds."""
    with atomic_path(path) as tmp:
        if is_remote(tmp):
            with _gfile().GFile(tmp, mode) as f:
                yield f
        else:
            with open(tmp, mode, **kwargs) as f:
                yield f
