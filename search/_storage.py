"""Where a study lives: Optuna RDB storage with heartbeats, opened the same way by every worker,
and a study-wide lock so that the study is created and its baselines enqueued exactly once
however many workers start at the same moment."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import optuna

from edgeslim.spaces import SpecError

__all__ = ["file_lock", "open_storage", "shared_storage", "shown_url", "study_lock"]

# a SQLite writer waits this long for another process's write to finish instead of failing with
# "database is locked" (Python's default is 5 s; a worker may be mid-commit of a large trial row)
SQLITE_TIMEOUT_S = 60.0
_CONNECT_TRIES = 4
# a file to append this process's storage statement count and seconds to at exit (bench_workers.py)
STATS_ENV = "EDGESLIM_STORAGE_STATS"


def _is_rdb(url: str) -> bool:
    return url.startswith(("sqlite:", "postgresql", "mysql"))


def shared_storage(url: str) -> bool:
    """Whether several processes can work on one study in ``url``: a SQLite file or a database
    server, not in-memory storage.

    Example:
        >>> shared_storage("sqlite:///studies/x/study.db"), shared_storage("sqlite:///:memory:")
        (True, False)
    """
    return _is_rdb(url) and ":memory:" not in url


def _sqlite_path(url: str) -> Path | None:
    path = url.split("///", 1)[1] if "///" in url else ""
    return Path(path) if path and path != ":memory:" else None


def _unreachable(url: str, e: BaseException) -> SpecError:
    shown = shown_url(url)
    first = str(getattr(e, "orig", None) or e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, ModuleNotFoundError):
        return SpecError(f"storage {shown}: the database driver is not installed ({e.name}); "
                         "pip install 'edgeslim[postgres]' for PostgreSQL")
    return SpecError(f"cannot open storage {shown}: {first}; check the host, port, database name, user and "
                     "password (or leave --storage out for SQLite in the study folder)")


def open_storage(url: str, heartbeat_s: int) -> str | optuna.storages.BaseStorage:
    """Optuna storage for ``url``; RDB storage (SQLite, PostgreSQL, MySQL) with heartbeats: a
    trial whose worker stops beating for ``2 x heartbeat_s`` (kill -9, a lost machine) is marked
    failed by the next trial any worker starts, and its plan is enqueued again once
    (``RetryHeartbeatStaleTrialCallback``; the copy's system attribute ``failed_trial`` names
    it). A storage that cannot be reached, or refuses the credentials, raises
    :class:`SpecError` with one line naming it (password hidden).

    Example:
        >>> type(open_storage("sqlite:///:memory:", 60)).__name__
        'RDBStorage'
    """
    if not _is_rdb(url):
        return url
    kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    path = _sqlite_path(url) if url.startswith("sqlite") else None
    if path is not None and not path.parent.is_dir():
        raise SpecError(f"storage {url}: folder {str(path.parent)!r} does not exist; create it or pick another URL")
    for attempt in range(_CONNECT_TRIES):
        try:
            with warnings.catch_warnings(), study_lock(url, "__schema__"):
                # heartbeats are experimental in Optuna; what we use of them is stable
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
                if os.environ.get(STATS_ENV):
                    _count_statements(storage, Path(os.environ[STATS_ENV]))
                return storage
        except SpecError:
            raise
        except Exception as e:  # noqa: BLE001 - sqlalchemy, the driver and Optuna each raise their own
            from sqlalchemy.exc import IntegrityError, ProgrammingError

            if isinstance(e, (IntegrityError, ProgrammingError)) and attempt + 1 < _CONNECT_TRIES:
                time.sleep(0.2 * (attempt + 1))  # another worker created the schema at the same moment
                continue
            raise _unreachable(url, e) from None
    raise AssertionError("unreachable")


def _count_statements(storage: optuna.storages.RDBStorage, out: Path) -> None:
    """Count the SQL statements this process sends to ``storage`` and the seconds they take
    (client side: round trip, server work and waiting on locks); one JSON line at exit."""
    import atexit
    import json
    import threading

    from sqlalchemy import event

    stats = {"pid": os.getpid(), "statements": 0, "seconds": 0.0}
    started: dict[int, float] = {}  # per thread: the heartbeat thread writes too

    @event.listens_for(storage.engine, "before_cursor_execute")
    def _before(*_: object) -> None:
        started[threading.get_ident()] = time.perf_counter()

    @event.listens_for(storage.engine, "after_cursor_execute")
    def _after(*_: object) -> None:
        t0 = started.pop(threading.get_ident(), None)
        if t0 is not None:
            stats["seconds"] += time.perf_counter() - t0
            stats["statements"] += 1

    def _write() -> None:
        with open(out, "a") as f:
            f.write(json.dumps(stats) + "\n")

    atexit.register(_write)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) while the block runs; released by
    the kernel if the process dies.

    Example:
        >>> import tempfile
        >>> with file_lock(Path(tempfile.mkdtemp()) / "x.lock"):
        ...     pass
    """
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def shown_url(url: str) -> str:
    """A storage URL fit to print: the password replaced by ``***``.

    Example:
        >>> shown_url("postgresql+psycopg://me:secret@db/studies")
        'postgresql+psycopg://me:***@db/studies'
    """
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL (e.g. a journal file): nothing to hide
        return url


@contextlib.contextmanager
def study_lock(url: str, name: str) -> Iterator[None]:
    """Hold a lock on study ``name`` in storage ``url`` across processes and machines: a file
    lock beside a SQLite file, an advisory lock on PostgreSQL (``pg_advisory_lock``), a named
    lock on MySQL (``GET_LOCK``); nothing for in-memory storage. Used where several workers could
    otherwise do the same one-time work at the same moment (create the study, enqueue the
    baselines, seed it).

    Example:
        >>> with study_lock("sqlite:///:memory:", "demo"):
        ...     pass
    """
    if url.startswith("sqlite"):
        path = _sqlite_path(url)
        if path is None or not path.parent.is_dir():
            yield
            return
        with file_lock(Path(f"{path}.lock")):
            yield
        return
    if not url.startswith(("postgresql", "mysql")):
        yield
        return
    import sqlalchemy as sa

    if url.startswith("postgresql"):  # advisory keys are signed 64-bit
        lock, unlock, params = ("SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)",
                                {"k": zlib.crc32(f"edgeslim:{name}".encode()) - 2**31})
    else:
        lock, unlock, params = "SELECT GET_LOCK(:k, 600)", "SELECT RELEASE_LOCK(:k)", {"k": f"edgeslim:{name}"[:64]}
    try:
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        conn = engine.connect()
    except Exception as e:  # noqa: BLE001
        raise _unreachable(url, e) from None
    try:
        conn.execute(sa.text(lock), params)
        try:
            yield
        finally:
            conn.execute(sa.text(unlock), params)
    finally:
        conn.close()
        engine.dispose()
