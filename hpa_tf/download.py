"""Fetch the public Human Protein Atlas images and write a ``train.csv`` for them.

``python -m hpa_tf.download --list kaggle_2021.tsv --out data/hpa-public --workers 16``

The list
    Either the list the competition published for the public HPA images (``kaggle_2021.tsv``,
    comma-separated despite its name), whose ``Image`` column is a URL prefix such as
    ``https://images.proteinatlas.org/10005/921_B9_1`` and whose ``Label`` column holds HPA
    location names separated by commas (``"Cytosol,Nucleoplasm"``); its ``in_trainset`` rows
    repeat the competition's training images and are skipped unless asked for; ``Cellline`` is
    kept. Or a plain list with columns ``ID,URL,Label``: ``URL`` the prefix, ``Label`` class ids
    (``0|5``) or location names separated by ``|``, ``,`` or ``;``. A tab-separated header is
    recognised too. The field's ID is the list's ``ID``, or for the competition's list the last
    two parts of the prefix (``10005_921_B9_1``: the file name alone repeats across antibodies).

What is fetched
    ``{prefix}_{color}.jpg`` for every colour (the website's colour-coded JPGs, which
    ``hpa_tf.io`` reads: red in the R plane, green in G, blue in B, yellow in R and G), into
    ``OUT/train/{ID}_{color}.jpg``. Fields without any label among the 19 classes are not
    fetched (``--keep-unlabeled`` fetches them too; they are listed in ``unlabeled.csv``).

Finished files
    A file is written to ``{name}.part`` and renamed to its final name only after it passed the
    check: the body has the length its ``Content-Length`` announced (urllib3 enforces it), is not
    empty, starts with the JPEG start-of-image marker, ends with the end-of-image marker and
    decodes (``check_jpeg``; this catches a short body sent without ``Content-Length`` too). So a
    file under its final name is finished and is never fetched again; ``.part`` files are never
    taken for finished ones and are cleared at the start of a run (``--recheck`` checks existing
    files again and fetches those that fail).

Retries
    Connection errors, timeouts, 429/500/502/503/504 answers, truncated bodies and bodies that
    fail the check are retried, with exponential back-off and jitter (urllib3's ``Retry``: the
    first retry at once, then ``backoff * 2**(n-1)`` seconds plus up to ``jitter`` seconds,
    at most ``backoff-max``), and the wait a ``Retry-After`` header asks for on 429/503. Other
    answers (404, 403, …) are final at once.

Outputs (each rewritten, atomically, at the end of every run)
    ``train.csv``     ``ID,Label,Source,Cellline,Image``: fields whose every colour is on disk and
                      that have a label among the 19 classes (``Label`` = ``"0|16"``,
                      ``Source`` = ``hpa-public``, ``Image`` = the URL prefix).
    ``failed.csv``    ``ID,Color,URL,Reason,Attempts``: files that could not be fetched this run.
    ``unmapped.csv``  ``Name,Fields``: label names outside the 19 classes and how many fields
                      carry each (their other names still count).
    ``unlabeled.csv`` ``ID,Image,Names``: fields none of whose names is among the 19 classes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import os
import re
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import cv2
import numpy as np
import urllib3
from urllib3.exceptions import HTTPError, MaxRetryError
from urllib3.util.retry import Retry

from hpa_tf.fileutil import atomic_open, raise_csv_field_size_limit
from hpa_tf.io import CHANNELS
from hpa_tf.labels import NUM_CLASSES, LabelError, classes_of_names, format_labels, parse_labels

log = logging.getLogger(__name__)

SOURCE = "hpa-public"
IMAGES_DIR = "train"
LABELS_FILE = "train.csv"
FAILED_FILE = "failed.csv"
UNMAPPED_FILE = "unmapped.csv"
UNLABELED_FILE = "unlabeled.csv"
PART_SUFFIX = ".part"
LOCK_FILE = ".download.lock"
#: answers worth asking again (rate limits and passing server trouble); anything else is final
RETRY_STATUSES = (429, 500, 502, 503, 504)
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_LABEL_SPLIT = re.compile(r"[|,;]")
_TRUE = {"true", "1", "yes", "y", "t"}


class ListError(ValueError):
    """A field list that cannot be used; the message names the file (and line)."""


class OutputError(OSError):
    """The output folder cannot be created or written; the message names it."""


# ----------------------------------------------------------------------------------------------
# The list of fields
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One listed field of view.

    ``labels`` are class ids 0..18 (empty when none of the field's names is among the 19
    classes), ``unknown`` the names outside them, ``prefix`` the URL the channel names extend.
    """

    image_id: str
    prefix: str
    labels: tuple[int, ...]
    names: tuple[str, ...]
    unknown: tuple[str, ...]
    cellline: str
    line: int

    def url(self, color: str) -> str:
        return f"{self.prefix}_{color}.jpg"


@dataclass
class FieldList:
    """A parsed list: its fields (in file order) and what was left aside while reading it."""

    path: str
    kind: str  # "hpa" (the competition's public-HPA list) or "plain" (ID,URL,Label)
    fields: list[Field]
    in_trainset: int = 0  # rows skipped because they repeat the competition's training images
    duplicates: int = 0  # repeated rows (same ID and prefix) read once

    @property
    def labelled(self) -> list[Field]:
        return [f for f in self.fields if f.labels]

    @property
    def unlabeled(self) -> list[Field]:
        return [f for f in self.fields if not f.labels]

    def unknown_names(self) -> Counter:
        """Label names outside the 19 classes → number of fields carrying each."""
        return Counter(name for f in self.fields for name in f.unknown)


def image_id_from_prefix(prefix: str) -> str:
    """The field ID for an HPA image URL prefix: its last two path parts joined by ``_``.

    >>> image_id_from_prefix("https://images.proteinatlas.org/10005/921_B9_1")
    '10005_921_B9_1'
    """
    parts = [p for p in urlsplit(prefix).path.split("/") if p]
    return "_".join(parts[-2:])


def _parse_label_text(text: str, where: str) -> tuple[list[int], tuple[str, ...], list[str]]:
    """``(class ids, the names as listed, names outside the 19)`` of one Label cell.

    Tokens that are integers are class ids (checked by ``parse_labels``); others are location names.
    """
    tokens = [" ".join(t.split()) for t in _LABEL_SPLIT.split(text or "")]
    tokens = [t for t in tokens if t]
    ids: set[int] = set()
    names = [t for t in tokens if not t.isdigit()]
    digits = [t for t in tokens if t.isdigit()]
    if digits:
        ids.update(parse_labels("|".join(digits), where=where))
    mapped, unknown = classes_of_names(names)
    ids.update(mapped)
    return sorted(ids), tuple(tokens), unknown


def _sniff_delimiter(header_line: str) -> str:
    return "\t" if "\t" in header_line and "," not in header_line else ","


def read_list(path: str | os.PathLike, include_trainset: bool = False) -> FieldList:
    """Read a field list (the competition's public-HPA list or a plain ``ID,URL,Label`` CSV).

    Raises
    ------
    ListError : an unreadable or empty file, missing columns, a row without a URL or with an
        unusable ID or URL, an ID listed twice with different URLs, a class id outside 0..18;
        the message names the file and line.
    """
    path = str(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except IsADirectoryError:
        raise ListError(f"{path}: is a folder, not a list file") from None
    except OSError as e:
        raise ListError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ListError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    first_line = text.split("\n", 1)[0]
    raise_csv_field_size_limit()
    reader = csv.DictReader(io.StringIO(text), delimiter=_sniff_delimiter(first_line))
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
        raise ListError(f"{path}: empty file (expected a header line)")
    reader.fieldnames = header
    if "Image" in header and "ID" not in header:
        kind, required, url_column = "hpa", ("Image", "Label"), "Image"
    else:
        kind, required, url_column = "plain", ("ID", "URL", "Label"), "URL"
    missing = [c for c in required if c not in header]
    if missing:
        raise ListError(
            f"{path}: header {header} lacks column(s) {missing} (expected Image,Label[,Cellline,in_trainset] as in "
            f"the competition's public HPA list, or ID,URL,Label)"
        )

    result = FieldList(path=path, kind=kind, fields=[])
    seen: dict[str, Field] = {}
    for row in reader:
        line_no = reader.line_num  # the file's line (a quoted value may span lines)
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue  # blank line
        where = f"{path} line {line_no}"
        if kind == "hpa" and not include_trainset and (row.get("in_trainset") or "").strip().lower() in _TRUE:
            result.in_trainset += 1
            continue
        prefix = (row.get(url_column) or "").strip().rstrip("_")
        if not prefix:
            raise ListError(f"{where}: empty {url_column}")
        scheme = urlsplit(prefix).scheme
        if scheme not in ("http", "https"):
            raise ListError(f"{where}: {url_column} {prefix!r} is not an http(s) URL")
        image_id = (row.get("ID") or "").strip() if kind == "plain" else image_id_from_prefix(prefix)
        if not _ID_RE.fullmatch(image_id):
            raise ListError(
                f"{where}: unusable field ID {image_id!r} (letters, digits, '.', '_', '-'; not starting with '.')"
            )
        try:
            labels, names, unknown = _parse_label_text(row.get("Label") or "", where)
        except LabelError as e:
            raise ListError(str(e)) from None
        item = Field(image_id=image_id, prefix=prefix, labels=tuple(labels), names=names, unknown=tuple(unknown),
                     cellline=(row.get("Cellline") or "").strip(), line=line_no)
        if image_id in seen:
            first = seen[image_id]
            if first.prefix != prefix:
                raise ListError(
                    f"{where}: field ID {image_id!r} also on line {first.line} with another URL ({first.prefix})"
                )
            result.duplicates += 1
            continue
        seen[image_id] = item
        result.fields.append(item)
    if not result.fields:
        skipped = f" ({result.in_trainset} rows of the competition's training set skipped)" if result.in_trainset else ""
        raise ListError(f"{path}: no fields listed{skipped}")
    return result


# ----------------------------------------------------------------------------------------------
# One file
# ----------------------------------------------------------------------------------------------


def check_jpeg(data: bytes) -> str | None:
    """Why ``data`` is not a complete JPEG, or ``None`` when it is.

    Checks, cheapest first: not empty, the start-of-image marker, the end-of-image marker (a
    truncated body lacks it; libjpeg would decode it with a grey tail and only a warning), and
    that OpenCV decodes it. The decode is at 1/8 scale: libjpeg still parses every header and
    entropy-decodes the whole scan, so it fails where a full decode fails, in less than half
    the time.
    """
    if not data:
        return "empty body"
    if not data.startswith(b"\xff\xd8"):
        return f"not a JPEG (starts with {data[:16]!r})"
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return "truncated JPEG (no end-of-image marker)"
    if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8) is None:
        return "JPEG does not decode"
    return None


class BodyError(Exception):
    """A response body that arrived but is not the file (short, empty, not a complete JPEG)."""


class FetchError(Exception):
    """A file that could not be fetched; ``reason`` says why, ``attempts`` how many requests it took."""

    def __init__(self, reason: str, attempts: int):
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one file is asked for.

    ``retries`` further attempts after the first; waits of ``backoff * 2**(n-1)`` s (none before
    the first retry) plus up to ``jitter`` s, capped at ``backoff_max``; a 429 or 503 answer with
    ``Retry-After`` is waited for as long as it asks instead. ``timeout`` (s) limits connecting
    and each read.
    """

    retries: int = 8
    backoff: float = 1.0
    backoff_max: float = 60.0
    jitter: float = 1.0
    timeout: float = 30.0

    def retry(self) -> Retry:
        return Retry(
            total=self.retries, backoff_factor=self.backoff, backoff_max=self.backoff_max,
            backoff_jitter=self.jitter, status_forcelist=RETRY_STATUSES, allowed_methods={"GET"},
            raise_on_status=False, respect_retry_after_header=True,
        )


def _describe(error: BaseException) -> str:
    """A one-line reason for a failed attempt (urllib3 wraps the cause; show the innermost)."""
    if isinstance(error, MaxRetryError) and error.reason is not None:
        error = error.reason
    if isinstance(error, BodyError):
        return str(error)
    text = " ".join(str(error).split())
    name = type(error).__name__
    return f"{name}: {text}" if text else name


_LOOPBACK = ("localhost", "127.", "::1", "[::1]")


class Fetcher:
    """Thread-safe HTTP GETs through urllib3 connection pools (one pool per host, ``maxsize``
    connections each), with the environment's ``http_proxy``/``https_proxy``/``no_proxy``
    (loopback addresses always go direct)."""

    def __init__(self, maxsize: int = 8, user_agent: str = "hpa-tf-download"):
        self._maxsize = maxsize
        self._headers = {"User-Agent": user_agent}
        self._direct = urllib3.PoolManager(num_pools=16, maxsize=maxsize, headers=self._headers)
        self._proxies: dict[str, object] = {}
        self._lock = threading.Lock()
        self._env_proxies = urllib.request.getproxies_environment()

    def _manager(self, url: str):
        parts = urlsplit(url)
        host = parts.hostname or ""
        proxy = self._env_proxies.get(parts.scheme)
        if not proxy or host.startswith(_LOOPBACK) or urllib.request.proxy_bypass_environment(host, self._env_proxies):
            return self._direct
        with self._lock:
            if proxy not in self._proxies:
                self._proxies[proxy] = urllib3.ProxyManager(proxy, num_pools=16, maxsize=self._maxsize,
                                                                  headers=self._headers)
            return self._proxies[proxy]

    def fetch(self, url: str, policy: RetryPolicy, check: Callable[[bytes], str | None] = check_jpeg) -> tuple[bytes, int]:
        """GET ``url`` until a body passes ``check``; returns ``(body, attempts)``.

        One urllib3 ``Retry`` counts every attempt: urllib3 retries connection errors and
        retryable statuses itself (honouring ``Retry-After``); a body that breaks off or fails
        the check is counted on the same object here, then waited for with its back-off.

        Raises FetchError with the last reason once the attempts are spent, or at once for a
        final answer (404, …).
        """
        timeout = urllib3.Timeout(connect=policy.timeout, read=policy.timeout)
        retry = policy.retry()
        manager = self._manager(url)
        while True:
            try:
                response = manager.request("GET", url, retries=retry, timeout=timeout, preload_content=False,
                                           enforce_content_length=True)
            except MaxRetryError as e:
                raise FetchError(_describe(e), policy.retries + 1) from None
            except HTTPError as e:  # e.g. an unparsable URL: not worth repeating
                raise FetchError(_describe(e), len(retry.history) + 1) from None
            retry = getattr(response, "retries", None) or retry
            attempts = len(retry.history) + 1
            if response.status != 200:
                response.drain_conn()
                response.release_conn()
                given_up = " (retries spent)" if response.status in RETRY_STATUSES else ""
                raise FetchError(f"HTTP {response.status} {response.reason or ''}".strip() + given_up, attempts)
            try:
                body = bytearray()
                for chunk in response.stream(1 << 16):
                    body += chunk
                problem = check(bytes(body))
                error: Exception | None = BodyError(problem) if problem else None
            except (HTTPError, OSError) as e:  # reset, timeout, or fewer bytes than Content-Length said
                error = e
            finally:
                response.release_conn()
            if error is None:
                return bytes(body), attempts
            try:
                retry = retry.increment("GET", url, error=error)
            except MaxRetryError as e:
                raise FetchError(_describe(e), attempts) from None
            log.debug("retrying %s after %s", url, _describe(error))
            retry.sleep()


def part_path(dest: str | os.PathLike) -> str:
    """The temporary name a file is written under before it is renamed to ``dest``."""
    return str(dest) + PART_SUFFIX


def write_finished(dest: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``dest`` via ``dest.part`` and a rename, so ``dest`` only ever holds a
    whole checked file. (Not ``fileutil.atomic_path``: its ``.tmp-…-{ID}_red.jpg`` names would
    look like channel files to ``hpa_tf.io.list_image_ids``.)"""
    tmp = part_path(dest)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


# ----------------------------------------------------------------------------------------------
# A whole list
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    image_id: str
    color: str
    url: str
    reason: str
    attempts: int


@dataclass
class DownloadResult:
    """What one run did. ``fetched``/``present``/``failed`` count files; ``fields`` the rows of
    ``train.csv``."""

    out: str
    fetched: int = 0
    present: int = 0
    failures: list[Failure] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    fields: int = 0
    unlabeled: int = 0
    unlabeled_fetched: bool = False
    unknown_names: int = 0
    in_trainset: int = 0
    duplicates: int = 0

    @property
    def failed(self) -> int:
        return len(self.failures)

    def line(self) -> str:
        rate = self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0
        parts = [f"fetched {self.fetched} files ({self.bytes / 1e6:.1f} MB, {rate:.1f} MB/s)",
                 f"{self.present} already present"]
        parts.append(f"{self.failed} failed (see {os.path.join(self.out, FAILED_FILE)})" if self.failed
                     else "0 failed")
        parts.append(f"{LABELS_FILE}: {self.fields} fields")
        if self.unlabeled:
            fate = "fetched, not in train.csv" if self.unlabeled_fetched else "left out"
            parts.append(f"{self.unlabeled} fields without a label among the {NUM_CLASSES} classes {fate} "
                         f"({UNLABELED_FILE})")
        if self.unknown_names:
            parts.append(f"{self.unknown_names} label names outside the {NUM_CLASSES} classes ({UNMAPPED_FILE})")
        if self.in_trainset:
            parts.append(f"{self.in_trainset} rows of the competition's training set skipped")
        if self.duplicates:
            parts.append(f"{self.duplicates} repeated rows read once")
        return "; ".join(parts)


def parse_colors(text: str) -> tuple[str, ...]:
    """``"red,green"`` → ``("red", "green")``; ValueError for an unknown or repeated colour."""
    colors = tuple(c.strip().lower() for c in text.split(",") if c.strip())
    bad = [c for c in colors if c not in CHANNELS]
    if not colors or bad or len(set(colors)) != len(colors):
        raise ValueError(f"colours must be distinct names among {','.join(CHANNELS)}, got {text!r}")
    return colors


def prepare_out(out: str | os.PathLike) -> list[str]:
    """Create ``out`` and ``out/train``; returns the folders this call created, outermost first.

    Raises OutputError naming the folder; whatever this call created before failing is removed.
    """
    out = os.path.abspath(out)
    created: list[str] = []
    missing = out
    while not os.path.exists(missing):  # the folders makedirs is about to create
        created.insert(0, missing)
        missing = os.path.dirname(missing)
    images = os.path.join(out, IMAGES_DIR)
    if not os.path.exists(images):
        created.append(images)
    try:
        os.makedirs(images, exist_ok=True)
        with open(os.path.join(out, LOCK_FILE), "a"):
            pass
    except OSError as e:
        remove_created(created)
        raise OutputError(f"{e.filename or out}: cannot create the output folder ({e.strerror or e})") from None
    return created


def remove_created(created: Sequence[str]) -> None:
    """Remove folders made by ``prepare_out`` (innermost first) that hold nothing but the lock file."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            lock = os.path.join(folder, LOCK_FILE)
            if os.path.exists(lock) and len(os.listdir(folder)) == 1:
                os.remove(lock)
            os.rmdir(folder)


@contextlib.contextmanager
def _exclusive(out: str) -> Iterator[None]:
    """Hold an advisory lock on ``out`` so two runs never write the same ``.part`` files."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(os.path.join(out, LOCK_FILE), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(f"{out}: another download is writing into this folder") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def download(
    fields: FieldList,
    out: str | os.PathLike,
    colors: Sequence[str] = CHANNELS,
    workers: int = 8,
    policy: RetryPolicy | None = None,
    keep_unlabeled: bool = False,
    recheck: bool = False,
    source: str = SOURCE,
    progress: bool = True,
) -> DownloadResult:
    """Fetch every colour of every field into ``out/train`` and write the label file and reports.

    ``out`` must exist (``prepare_out``). Files already finished are not fetched (with
    ``recheck`` they are checked again and fetched when they fail). Returns the counts; the
    failures are in ``out/failed.csv``.
    """
    out = str(out)
    policy = policy or RetryPolicy()
    images = os.path.join(out, IMAGES_DIR)
    chosen = fields.fields if keep_unlabeled else fields.labelled
    result = DownloadResult(out=out, unlabeled=len(fields.unlabeled), unlabeled_fetched=keep_unlabeled,
                            unknown_names=len(fields.unknown_names()), in_trainset=fields.in_trainset,
                            duplicates=fields.duplicates)

    todo: list[tuple[Field, str, str]] = []
    for item in chosen:
        for color in colors:
            dest = os.path.join(images, f"{item.image_id}_{color}.jpg")
            if os.path.isfile(dest) and not recheck:
                result.present += 1
            else:
                todo.append((item, color, dest))

    with _exclusive(out):
        _remove_stale_parts(images)
        fetcher = Fetcher(maxsize=max(1, workers))
        bar = None
        if progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="download", unit="file", dynamic_ncols=True)
        start = time.perf_counter()

        def job(item: Field, color: str, dest: str) -> int | None:
            """Bytes fetched, or None for a finished file that passed ``--recheck``."""
            if os.path.isfile(dest):
                with open(dest, "rb") as f:
                    problem = check_jpeg(f.read())
                if problem is None:
                    return None
                log.warning("%s: %s; fetching it again", dest, problem)
                os.remove(dest)  # not finished after all: if fetching fails, the field is incomplete
            data, _ = fetcher.fetch(item.url(color), policy)
            write_finished(dest, data)
            return len(data)

        pending: dict[Future, tuple[Field, str, str]] = {}
        pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="download")
        try:
            queue = iter(todo)
            window = max(1, workers) * 4  # bounded: a list of 300,000 files never becomes 300,000 futures

            def refill() -> None:
                for task in queue:
                    pending[pool.submit(job, *task)] = task
                    if len(pending) >= window:
                        return

            refill()
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    item, color, dest = pending.pop(future)
                    try:
                        size = future.result()
                    except FetchError as e:
                        result.failures.append(Failure(item.image_id, color, item.url(color), e.reason, e.attempts))
                    except OSError as e:
                        result.failures.append(Failure(item.image_id, color, item.url(color),
                                                       f"cannot write {dest}: {e.strerror or e}", 0))
                    except Exception as e:  # one odd file must not end a run of thousands
                        result.failures.append(Failure(item.image_id, color, item.url(color), _describe(e), 0))
                    else:
                        if size is None:
                            result.present += 1
                        else:
                            result.bytes += size
                            result.fetched += 1
                    if bar is not None:
                        elapsed = max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix_str(f"{result.bytes / 1e6:.1f} MB, {result.bytes / 1e6 / elapsed:.2f} MB/s, "
                                            f"{result.failed} failed", refresh=False)
                        bar.update(1)
                refill()
        except BaseException:
            # Ctrl-C: drop what has not started; files being fetched still finish or stay .part
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        else:
            pool.shutdown()
        finally:
            if bar is not None:
                bar.close()
            result.seconds = time.perf_counter() - start
            _write_reports(fields, out, colors, source, result)
    return result


def _remove_stale_parts(images: str) -> None:
    """Delete ``.part`` files a killed run left behind (only called while holding the folder's lock)."""
    with os.scandir(images) as entries:
        for entry in entries:
            if entry.name.endswith(PART_SUFFIX) and entry.is_file():
                with contextlib.suppress(OSError):
                    os.remove(entry.path)


def _write_reports(fields: FieldList, out: str, colors: Sequence[str], source: str, result: DownloadResult) -> None:
    images = os.path.join(out, IMAGES_DIR)
    rows = []
    for item in fields.labelled:
        if all(os.path.isfile(os.path.join(images, f"{item.image_id}_{c}.jpg")) for c in colors):
            rows.append([item.image_id, format_labels(item.labels), source, item.cellline, item.prefix])
    result.fields = len(rows)
    order = {f.image_id: n for n, f in enumerate(fields.fields)}
    result.failures.sort(key=lambda f: (order.get(f.image_id, -1), list(colors).index(f.color)))
    _write_csv(os.path.join(out, LABELS_FILE), ["ID", "Label", "Source", "Cellline", "Image"], rows)
    _write_csv(os.path.join(out, FAILED_FILE), ["ID", "Color", "URL", "Reason", "Attempts"],
               [[f.image_id, f.color, f.url, f.reason, f.attempts] for f in result.failures])
    _write_csv(os.path.join(out, UNMAPPED_FILE), ["Name", "Fields"], fields.unknown_names().most_common())
    _write_csv(os.path.join(out, UNLABELED_FILE), ["ID", "Image", "Names"],
               [[f.image_id, f.prefix, "|".join(f.names)] for f in fields.unlabeled])


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

EXAMPLE = """\
example:
  python -m hpa_tf.download --list kaggle_2021.tsv --out data/hpa-public --workers 16
  python -m tfrecord_builder --data-dir data/hpa-public/train --labels data/hpa-public/train.csv \\
      --out shards-hpa-public --source hpa-public

A rerun fetches only what is missing. Exit status: 0 when every file is in place, 1 when some
failed (listed in OUT/failed.csv; rerun to try them again), 2 for a bad list or output folder.
"""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line (``prog``: the name its usage shows)."""
    p = argparse.ArgumentParser(
        prog=prog or "python -m hpa_tf.download",
        description="Fetch the public Human Protein Atlas images of a list ({prefix}_{color}.jpg per field) into "
        "OUT/train and write OUT/train.csv in the 19 classes, with retries, resume and a report of failures.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--list", required=True, dest="list_path", metavar="LIST",
                   help="the competition's public HPA list (Image,Label,...) or a CSV with ID,URL,Label")
    p.add_argument("--out", required=True, help="output folder (images go to OUT/train)")
    p.add_argument("--workers", type=int, default=8, help="parallel connections (default 8)")
    p.add_argument("--colors", default=",".join(CHANNELS),
                   help=f"channels to fetch, comma-separated (default {','.join(CHANNELS)})")
    p.add_argument("--retries", type=int, default=8, help="further attempts per file after the first (default 8)")
    p.add_argument("--backoff", type=float, default=1.0,
                   help="back-off factor in s: waits of backoff*2**(n-1) before retry n>1 (default 1.0)")
    p.add_argument("--backoff-max", type=float, default=60.0, help="longest back-off wait in s (default 60)")
    p.add_argument("--jitter", type=float, default=1.0, help="up to this many random seconds added to each wait (default 1.0)")
    p.add_argument("--timeout", type=float, default=30.0, help="connect and read timeout in s (default 30)")
    p.add_argument("--include-trainset", action="store_true",
                   help="also fetch the rows the list marks in_trainset (the competition's own training images)")
    p.add_argument("--keep-unlabeled", action="store_true",
                   help="also fetch fields with no label among the 19 classes (listed in unlabeled.csv, not in train.csv)")
    p.add_argument("--recheck", action="store_true", help="check files already present again; fetch those that fail")
    p.add_argument("--source", default=SOURCE, help=f"value of train.csv's Source column (default {SOURCE})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    p = build_parser(prog)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="%(message)s")
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # retries are routine; what fails in the end is in failed.csv
    try:
        colors = parse_colors(a.colors)
    except ValueError as e:
        p.error(str(e))
    if a.workers < 1:
        p.error(f"--workers must be at least 1, got {a.workers}")
    if a.retries < 0:
        p.error(f"--retries must be at least 0, got {a.retries}")
    policy = RetryPolicy(retries=a.retries, backoff=a.backoff, backoff_max=a.backoff_max, jitter=a.jitter,
                         timeout=a.timeout)
    try:
        fields = read_list(a.list_path, include_trainset=a.include_trainset)
    except ListError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not fields.labelled and not a.keep_unlabeled:
        print(f"error: {a.list_path}: no field has a label among the {NUM_CLASSES} classes "
              f"({len(fields.unlabeled)} fields; --keep-unlabeled fetches them anyway)", file=sys.stderr)
        return 2
    try:
        created = prepare_out(a.out)
    except OutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = download(fields, a.out, colors=colors, workers=a.workers, policy=policy,
                          keep_unlabeled=a.keep_unlabeled, recheck=a.recheck, source=a.source,
                          progress=not (a.no_progress or a.quiet))
    except OutputError as e:
        remove_created(created)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the reports cannot be written into an existing read-only folder
        print(f"error: {e.filename or a.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: finished files are kept; rerun the same command to fetch the rest into {a.out}",
              file=sys.stderr)
        return 130
    print(result.line())
    return 1 if result.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
