"""Files, local or remote: the one gfile-or-local helper module, and write-then-rename helpers so
that a killed run never leaves a half-written file under its final name.

Paths with a URL scheme (``gs://…``) go through ``tf.io.gfile`` (imported lazily, so light modules
stay free of TensorFlow); local paths use the standard library.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import glob as _glob
import json
import os
import sys
import uuid
from collections.abc import Iterator
from typing import Any


def is_remote(path: str | os.PathLike) -> bool:
    """True for ``scheme://`` paths that only tf.io.gfile can write."""
    return "://" in str(path)


def _gfile():
    import tensorflow as tf  # lazy: keeps light modules free of TensorFlow

    return tf.io.gfile


def exists(path: str | os.PathLike) -> bool:
    return _gfile().exists(str(path)) if is_remote(path) else os.path.exists(path)


def isdir(path: str | os.PathLike) -> bool:
    return _gfile().isdir(str(path)) if is_remote(path) else os.path.isdir(path)


def listdir(path: str | os.PathLike) -> list[str]:
    """Names in a folder (no trailing ``/``); ``[]`` when the folder does not exist."""
    if is_remote(path):
        return [n.rstrip("/") for n in _gfile().listdir(str(path))] if _gfile().isdir(str(path)) else []
    return os.listdir(path) if os.path.isdir(path) else []


def glob(pattern: str | os.PathLike) -> list[str]:
    """Paths matching a glob pattern, sorted (``*`` does not match a leading dot locally)."""
    if is_remote(pattern):
        return sorted(_gfile().glob(str(pattern)))
    return sorted(_glob.glob(str(pattern)))


def file_size(path: str | os.PathLike) -> int:
    return int(_gfile().stat(str(path)).length) if is_remote(path) else os.path.getsize(path)


def open_read(path: str | os.PathLike, mode: str = "r", newline: str | None = None):
    """An open file for reading (text mode reads UTF-8; ``newline=""`` for the csv module)."""
    if is_remote(path):
        return _gfile().GFile(str(path), mode)
    if "b" in mode:
        return open(path, mode)
    return open(path, mode, encoding="utf-8", newline=newline)


def read_text(path: str | os.PathLike) -> str:
    with open_read(path, "r") as f:
        return f.read()


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content (``ValueError`` on invalid JSON, ``OSError`` when unreadable)."""
    return json.loads(read_text(path))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` atomically (temporary name, then rename)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: object, indent: int = 1) -> None:
    """Write ``obj`` as JSON atomically."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


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
            if "b" not in mode:
                kwargs.setdefault("encoding", "utf-8")
            with open(tmp, mode, **kwargs) as f:
                yield f


def raise_csv_field_size_limit() -> None:
    """Let Python's ``csv`` read fields of any size (a process-wide setting).

    A PredictionString or an encoded truth mask reaches hundreds of kilobytes, past ``csv``'s
    default field limit of 128 KiB (``_csv.Error: field larger than field limit``). Every CSV
    reader of the project calls this first; a user's own script reading these files needs
    ``csv.field_size_limit(sys.maxsize)`` (or this function, also importable from
    ``hpa_tf.submission`` and ``hpa_tf.io``) too.
    """
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # pragma: no cover - 32-bit C long
            limit //= 2


def describe_write_error(exc: BaseException, out: str | os.PathLike) -> str | None:
    """One line for an error met while writing under ``out`` (a full disk, no permission, a
    TensorFlow file-system error), or None when ``exc`` is not such an error.

    Writers here go through temporary names, so the line can say that nothing half-written is left
    under a final name and that a rerun resumes.
    """
    if isinstance(exc, OSError):
        what = exc.strerror or str(exc)
        where = exc.filename or out
        full = exc.errno == errno.ENOSPC
    elif type(exc).__module__.startswith("tensorflow") and hasattr(exc, "message"):  # tf.errors.OpError
        what = str(exc.message).splitlines()[0] if exc.message else type(exc).__name__
        where = out
        full = "no space left" in what.lower()
    else:
        return None
    line = f"{where}: {what}"
    if full:
        line += f" (disk full while writing {out}: nothing half-written is left under a final name; free space and rerun)"
    return line

