"""The durable spool: queued writes kept in one SQLite file per process until acknowledged.

A live ``Spool`` stages writes on the callers' threads (a list append) and one background
thread commits them in groups, so a process crash loses at most the last commit interval. A
row is deleted when its backend acknowledges the write. The owning process holds an exclusive
``flock`` on ``<file>.lock`` for its whole life and the kernel releases it when the process
dies, so a file whose lock can be taken is an orphan that ``ClaimedSpool`` can replay. The
file stores backend URIs only after ``redact_uri``. Directories it creates are 0700, files 0600.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import pathlib
import secrets
import socket
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Sequence

from mlflow_azdual.coalesce import Write
from mlflow_azdual.codec import decode_write, encode_write
from mlflow_azdual.logs import get_logger
from mlflow_azdual.uri import redact_uri

_logger = get_logger(__name__)

FORMAT = "mlflow-azdual-spool"
FORMAT_VERSION = 1
DATABRICKS_LOCAL_DISK = "/local_disk0"
FILE_PREFIX = "spool-"
FILE_SUFFIX = ".sqlite"
LOCK_SUFFIX = ".lock"
# Files that SQLite keeps beside a database in WAL mode.
SIDE_FILE_SUFFIXES = ("-wal", "-shm")
MAX_ERROR_TEXT_CHARS = 300
# Repeated commit failures (a full disk, say) are logged at most once per this interval.
COMMIT_FAILURE_LOG_INTERVAL_S = 60.0

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE writes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    backend TEXT NOT NULL,
    seq INTEGER NOT NULL,
    run_id TEXT,
    operation TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_s REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    uncertain INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX writes_backend_id ON writes (backend, id);
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    backend TEXT NOT NULL,
    seq INTEGER,
    run_id TEXT,
    operation TEXT,
    payload TEXT,
    reason TEXT NOT NULL,
    created_s REAL NOT NULL
);
"""

# Many rows go into one statement as one JSON array, because the sqlite3 module releases the
# GIL around every step. With executemany, a commit thread re-acquires the GIL once per row.
# While a training loop held the GIL, 2,000 rows took 0.38 s instead of 2 ms (one statement:
# 19 ms), measured on the 2-CPU test machine with Python 3.11 and SQLite 3.40.
_INSERT_WRITES = (
    "INSERT INTO writes (id, backend, seq, run_id, operation, payload, created_s, attempts, "
    "uncertain) SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
    "json_extract(value, '$[2]'), json_extract(value, '$[3]'), json_extract(value, '$[4]'), "
    "json_extract(value, '$[5]'), json_extract(value, '$[6]'), json_extract(value, '$[7]'), "
    "json_extract(value, '$[8]') FROM json_each(?)"
)
# One result row holding a JSON array, for the same reason as _INSERT_WRITES: fetching row by
# row re-acquires the GIL once per row.
_SELECT_PENDING = (
    "SELECT json_group_array(json_array(id, seq, run_id, operation, payload, attempts, "
    "uncertain)) FROM (SELECT * FROM writes WHERE backend = ? AND id > ? ORDER BY id LIMIT ?)"
)
_MOVE_TO_DEAD_LETTERS = (
    "INSERT INTO dead_letters (backend, seq, run_id, operation, payload, reason, created_s) "
    "SELECT backend, seq, run_id, operation, payload, ?, ? FROM writes WHERE id = ?"
)
_INSERT_DEAD_LETTER = (
    "INSERT INTO dead_letters (backend, seq, run_id, operation, payload, reason, created_s) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_RECORD_FAILURES = (
    "UPDATE writes SET attempts = attempts + 1, uncertain = ?, last_error = ? "
    "WHERE id IN (SELECT value FROM json_each(?))"
)
_DELETE_WRITE = "DELETE FROM writes WHERE id = ?"
_DELETE_WRITES = "DELETE FROM writes WHERE id IN (SELECT value FROM json_each(?))"

# Spools and claimed spools open in this process, for the fork handler and orphan_files.
_open_spools: weakref.WeakSet = weakref.WeakSet()
# Connections inherited by a forked child. They stay referenced and are never closed there,
# because closing them could checkpoint or delete the parent's WAL file.
_inherited_connections: list = []


class SpoolFileError(Exception):
    """A spool file that cannot be used: not a spool, corrupt, or of a newer format version."""

    def __init__(self, path: str, problem: str, fix: str | None = None):
        self.path = path
        self.problem = problem
        if fix is None:
            fix = (
                "Move it aside (mlflow_azdual.spool.quarantine renames it) or delete it after "
                "checking that it contains no writes you need."
            )
        super().__init__(f"Spool file {path} {problem}. {fix}")


# Locations and files


def spool_root(option_value: str | None) -> str:
    """Return the spool root: the option, else Databricks' local disk, else the home directory."""
    if option_value:
        return option_value
    if os.path.isdir(DATABRICKS_LOCAL_DISK) and os.access(DATABRICKS_LOCAL_DISK, os.W_OK):
        return os.path.join(DATABRICKS_LOCAL_DISK, "mlflow-azdual", "spool")
    return os.path.join(os.path.expanduser("~"), ".mlflow-azdual", "spool")


def spool_directory(root: str, primary_uri: str, secondary_uri: str) -> str:
    """Return the directory of one backend pair: a hash of the two URIs after ``redact_uri``.

    Redacting first keeps secrets out of the path, and keeps the directory when a token in a
    URI is rotated.
    """
    pair = f"{redact_uri(primary_uri)}\n{redact_uri(secondary_uri)}"
    return os.path.join(root, hashlib.sha256(pair.encode("utf-8")).hexdigest()[:16])


def _make_private_directory(directory: str) -> None:
    # Every directory created here gets mode 0700 whatever the umask. Existing directories keep
    # their mode, so nothing is ever loosened.
    missing = []
    current = os.path.abspath(directory)
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        os.chmod(path, 0o700)


def _create_private_file(path: str) -> int:
    # O_EXCL: the name is new, so the mode set here is the file's whole history.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def _make_side_files_private(path: str) -> None:
    for suffix in SIDE_FILE_SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path + suffix, 0o600)


def _unlink_if_exists(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _spool_files(directory: str) -> list:
    return sorted(glob.glob(os.path.join(glob.escape(directory), f"{FILE_PREFIX}*{FILE_SUFFIX}")))


def _hostname() -> str:
    name = socket.gethostname() or "localhost"
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name)


# Locks


def _try_lock(lock_path: str, create: bool) -> int | None:
    """Take ``flock(LOCK_EX)`` on ``lock_path`` and return its descriptor, or None if taken."""
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    try:
        fd = os.open(lock_path, flags, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    # The lock file may have been removed between open and flock by a spool that closed empty.
    # Then the lock is on an unlinked file and protects nothing.
    try:
        current = os.stat(lock_path)
    except FileNotFoundError:
        current = None
    if current is None or current.st_ino != os.fstat(fd).st_ino:
        os.close(fd)
        return None
    return fd


def _lock_is_held(lock_path: str) -> bool:
    """Return True when some process holds ``lock_path``, and False for a missing lock file."""
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# SQLite


def _connect(path: str, mode: str) -> sqlite3.Connection:
    # mode=rw and mode=ro never create a database, so a file removed meanwhile is not recreated.
    uri = f"{pathlib.Path(os.path.abspath(path)).as_uri()}?mode={mode}"
    return sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)


def _use_wal(connection: sqlite3.Connection) -> None:
    # synchronous=NORMAL in WAL mode keeps committed rows through a process crash but may lose
    # the last commits on a power loss or kernel crash (SQLite documentation, "PRAGMA synchronous").
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")


def _read_meta(connection: sqlite3.Connection, path: str, check_integrity: bool) -> dict:
    """Return the meta table of a spool file, or raise SpoolFileError for any other file."""
    try:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        tables = {name for (name,) in rows}
    except sqlite3.DatabaseError as error:
        raise SpoolFileError(path, f"is not a SQLite database or is corrupt ({error})") from None
    if "meta" not in tables:
        raise SpoolFileError(path, "is not a spool file: it has no meta table")
    try:
        meta = dict(connection.execute("SELECT key, value FROM meta"))
    except sqlite3.DatabaseError as error:
        raise SpoolFileError(path, f"is corrupt: its meta table cannot be read ({error})") from None

    if meta.get("format") != FORMAT:
        raise SpoolFileError(path, f"is not a spool file: meta format is {meta.get('format')!r}")
    try:
        version = int(meta.get("version", ""))
    except ValueError:
        raise SpoolFileError(path, f"is corrupt: invalid version {meta.get('version')!r}") from None
    if version > FORMAT_VERSION:
        raise SpoolFileError(
            path,
            f"has format version {version}, written by a newer mlflow-azdual (this one reads "
            f"version {FORMAT_VERSION})",
            fix="Replay it with that newer mlflow-azdual, or move it aside.",
        )
    if version < 1:
        raise SpoolFileError(path, f"is corrupt: invalid version {version}")
    if not {"writes", "dead_letters"} <= tables:
        raise SpoolFileError(path, "is corrupt: its writes or dead_letters table is missing")

    if check_integrity:
        try:
            result = connection.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as error:
            result = str(error)
        if result != "ok":
            raise SpoolFileError(path, f"is corrupt: SQLite quick_check reports {result!r}")
    return meta


def _open_read_only(path: str) -> sqlite3.Connection:
    """Open ``path`` read-only, or raise SpoolFileError naming it."""
    try:
        return _connect(path, "ro")
    except sqlite3.Error as error:
        raise SpoolFileError(path, f"cannot be opened ({error})") from None


def _check_file(path: str) -> dict:
    """Return the meta table of the spool file ``path``, checked read-only with quick_check."""
    connection = _open_read_only(path)
    try:
        return _read_meta(connection, path, check_integrity=True)
    finally:
        connection.close()


def _read_counts(connection: sqlite3.Connection) -> dict:
    counts = {}
    rows = connection.execute(
        "SELECT backend, COUNT(*), MIN(created_s), SUM(attempts) FROM writes GROUP BY backend"
    )
    for backend, pending, oldest_created_s, attempts in rows:
        counts[backend] = {
            "pending": pending,
            "oldest_created_s": oldest_created_s,
            "attempts": attempts,
            "dead_letters": 0,
        }
    rows = connection.execute("SELECT backend, COUNT(*) FROM dead_letters GROUP BY backend")
    for backend, dead_letters in rows:
        entry = counts.setdefault(
            backend,
            {"pending": 0, "oldest_created_s": None, "attempts": 0, "dead_letters": 0},
        )
        entry["dead_letters"] = dead_letters
    return counts


def _first_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return (lines[0] if lines else "")[:MAX_ERROR_TEXT_CHARS]


class _SpoolDatabase:
    """An open spool file whose lock this process holds: the SQL shared by both spool kinds."""

    def __init__(self, path: str, connection: sqlite3.Connection, lock_fd: int):
        self.path = path
        self._connection = connection
        self._lock_fd = lock_fd
        # Serializes every use of the connection, and makes a commit one unit.
        self._db_lock = threading.RLock()
        self._closed = False
        self._inherited = False
        _open_spools.add(self)

    @contextlib.contextmanager
    def _transaction(self):
        self._connection.execute("BEGIN IMMEDIATE")
        try:
            yield self._connection
        except BaseException:
            self._connection.execute("ROLLBACK")
            raise
        self._connection.execute("COMMIT")

    @contextlib.contextmanager
    def _corruption_as_file_error(self):
        try:
            yield
        except sqlite3.DatabaseError as error:
            # Only the base class is corruption (SQLITE_CORRUPT, SQLITE_NOTADB). Subclasses such
            # as OperationalError (disk full, I/O error) keep their type.
            if type(error) is sqlite3.DatabaseError:
                raise SpoolFileError(self.path, f"is corrupt ({error})") from error
            raise

    def _check_usable(self) -> None:
        if self._inherited:
            raise RuntimeError(
                f"Spool file {self.path} belongs to the parent of this forked process. Create "
                "a new Spool in this process."
            )
        if self._closed:
            raise RuntimeError(f"Spool file {self.path} is closed.")

    def read_pending(self, backend: str, after_id: int = 0, limit: int = 1000) -> list:
        """Return up to ``limit`` committed writes of ``backend`` with id > ``after_id``, by id.

        Each write has ``spool_id``, ``attempts`` and ``uncertain`` set from its row. A row
        whose payload cannot be decoded is moved to dead_letters and logged, not returned.
        """
        self._check_usable()
        with self._db_lock, self._corruption_as_file_error():
            (text,) = self._connection.execute(
                _SELECT_PENDING, (backend, after_id, limit)
            ).fetchone()
        rows = json.loads(text) if text else []
        writes = []
        undecodable = []
        for row_id, seq, run_id, operation, payload, attempts, uncertain in rows:
            try:
                write = decode_write(seq, run_id, operation, payload)
            # Any exception means this stored row cannot be replayed (JSON, protobuf, a class
            # that no longer exists), and it must not stop the rows after it.
            except Exception as error:  # noqa: BLE001
                undecodable.append((row_id, seq, operation, run_id, error))
                continue
            write.spool_id = row_id
            write.attempts = attempts
            write.uncertain = bool(uncertain)
            writes.append(write)
        if undecodable:
            self._dead_letter_undecodable(backend, undecodable)
        return writes

    def _dead_letter_undecodable(self, backend: str, undecodable: list) -> None:
        with self._db_lock, self._corruption_as_file_error(), self._transaction() as db:
            now_s = time.time()
            for row_id, _, _, _, error in undecodable:
                self._move_to_dead_letters(
                    db, row_id, f"payload cannot be decoded: {error!r}", now_s
                )
        row_id, seq, operation, run_id, error = undecodable[0]
        _logger.error(
            "Spool %s: %d %s write(s) cannot be decoded and were moved to dead letters. The "
            "first is id=%s seq=%s operation=%s run_id=%s: %r",
            self.path, len(undecodable), backend, row_id, seq, operation, run_id or "-", error,
        )

    def counts(self) -> dict:
        """Return committed counts per backend.

        Each backend maps to ``pending`` rows, ``oldest_created_s`` (Unix time, None without
        rows), the sum of ``attempts`` and the number of ``dead_letters``.
        """
        self._check_usable()
        with self._db_lock, self._corruption_as_file_error():
            return _read_counts(self._connection)

    @staticmethod
    def _move_to_dead_letters(db, row_id: int, reason: str, now_s: float) -> None:
        db.execute(_MOVE_TO_DEAD_LETTERS, (reason, now_s, row_id))
        db.execute(_DELETE_WRITE, (row_id,))

    @staticmethod
    def _insert_dead_letter(db, backend, write, reason: str, now_s: float) -> None:
        """Insert ``write``, which has no row, into dead_letters."""
        try:
            payload = encode_write(write)
        except TypeError as error:
            payload = None
            reason = f"{reason} (payload not stored: {error})"
        db.execute(
            _INSERT_DEAD_LETTER,
            (backend, write.seq, write.run_id, write.operation, payload, reason, now_s),
        )

    @staticmethod
    def _record_failures(db, failures: Iterable) -> None:
        """Apply (row id, uncertain, error text) failures to their rows."""
        # One statement per distinct outcome: the writes of one failed request share it.
        groups = {}
        for row_id, uncertain, text in failures:
            groups.setdefault((int(uncertain), _first_line(text)), []).append(row_id)
        for (uncertain, text), row_ids in groups.items():
            db.execute(_RECORD_FAILURES, (uncertain, text, json.dumps(row_ids)))

    @staticmethod
    def _delete_rows(db, row_ids: Iterable[int]) -> None:
        row_ids = list(row_ids)
        if row_ids:
            db.execute(_DELETE_WRITES, (json.dumps(row_ids),))

    def _close_files(self, remove_if_empty: bool) -> None:
        """Close the connection, remove the files if asked and empty, then release the lock."""
        try:
            try:
                remove = remove_if_empty and self._is_empty()
            finally:
                self._connection.close()
            # The database goes before its lock file, so that a process that takes the lock
            # after this one finds no database to claim.
            if remove:
                for suffix in ("",) + SIDE_FILE_SUFFIXES + (LOCK_SUFFIX,):
                    _unlink_if_exists(self.path + suffix)
        finally:
            os.close(self._lock_fd)
            self._closed = True
            _open_spools.discard(self)

    def _is_empty(self) -> bool:
        with self._db_lock:
            row = self._connection.execute(
                "SELECT EXISTS (SELECT 1 FROM writes) OR EXISTS (SELECT 1 FROM dead_letters)"
            ).fetchone()
        return not row[0]

    def _disown_after_fork(self) -> None:
        # In a forked child: keep the parent's connection alive but unused, and drop this
        # process's copy of the lock descriptor so that the lock ends with the parent.
        self._inherited = True
        _inherited_connections.append(self._connection)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


# The live spool of this process


class Spool(_SpoolDatabase):
    """The spool file of this process, filled by its write queues. Thread-safe.

    ``add``, ``ack``, ``dead_letter`` and ``record_failure`` only stage work. One commit
    (by the background thread every ``commit_interval_s``, or by ``commit`` and
    ``wait_durable``) applies all staged work in one transaction. A ``Write`` object belongs
    to one backend at a time, because ``spool_id`` stores one row id. Call ``close`` before the
    process exits, because work staged after the last commit is lost otherwise.
    """

    def __init__(self, path, connection, lock_fd, commit_interval_s: float):
        super().__init__(path, connection, lock_fd)
        self.commit_interval_s = commit_interval_s
        self._lock = threading.Lock()  # guards the staged lists below
        self._work_ready = threading.Condition(self._lock)
        self._staged = []  # (backend, write, created_s)
        self._acked = []  # (backend, write)
        self._dead = []  # (backend, write, reason)
        self._failures = []  # (backend, write, error text, uncertain)
        # Writes that could not be encoded, by id(write), so that wait_durable can report them.
        # The dict keeps them alive, so an id is not reused while it is listed.
        self._unencodable = {}
        self._logged_unencodable_operations = set()
        self._thread = None
        self._stopping = False
        self._stop = threading.Event()
        self._last_failure_log_s = None
        self._suppressed_failure_logs = 0

    @classmethod
    def create(
        cls, directory: str, primary_uri: str, secondary_uri: str, commit_interval_s: float = 0.2
    ) -> Spool:
        """Create a new spool file in ``directory`` (made 0700 if missing) and lock it."""
        _make_private_directory(directory)
        name = f"{FILE_PREFIX}{_hostname()}-{os.getpid()}-{secrets.token_hex(4)}{FILE_SUFFIX}"
        path = os.path.join(directory, name)
        lock_fd = _create_private_file(path + LOCK_SUFFIX)
        connection = None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The file exists with mode 0600 before SQLite opens it, whatever the umask.
            os.close(_create_private_file(path))
            connection = _connect(path, "rw")
            _use_wal(connection)
            meta = {
                "format": FORMAT,
                "version": str(FORMAT_VERSION),
                "primary": redact_uri(primary_uri),
                "secondary": redact_uri(secondary_uri),
                "pid": str(os.getpid()),
                "hostname": socket.gethostname(),
                "created_s": repr(time.time()),
            }
            # Statement by statement, because executescript would commit before the meta rows.
            connection.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)
            connection.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
            connection.execute("COMMIT")
            _make_side_files_private(path)
        except BaseException:
            if connection is not None:
                connection.close()
            for suffix in ("",) + SIDE_FILE_SUFFIXES + (LOCK_SUFFIX,):
                _unlink_if_exists(path + suffix)
            os.close(lock_fd)
            raise
        return cls(path, connection, lock_fd, commit_interval_s)

    # Staging, on the callers' threads

    def add(self, backend: str, write: Write) -> None:
        """Stage ``write``, whose ``spool_id`` is None, so that the next commit inserts its row."""
        if self._stopping or self._inherited:
            self._check_usable()
            raise RuntimeError(f"Spool file {self.path} is closing.")
        entry = (backend, write, time.time())
        with self._lock:
            self._staged.append(entry)
            if self._thread is None:
                self._start_committer()
            elif len(self._staged) == 1:
                self._work_ready.notify()

    def ack(self, backend: str, writes: Iterable[Write]) -> None:
        """Stage deleting the rows of ``writes`` that ``backend`` acknowledged.

        A write that has no row yet is never inserted.
        """
        self._check_usable()
        entries = [(backend, write) for write in writes]
        with self._lock:
            self._acked.extend(entries)
            self._work_ready.notify()

    def dead_letter(self, backend: str, write: Write, reason: str) -> None:
        """Stage moving the row of ``write`` to dead_letters with ``reason``.

        A write without a row yet goes straight into dead_letters.
        """
        self._check_usable()
        with self._lock:
            self._dead.append((backend, write, reason))
            self._work_ready.notify()

    def record_failure(self, backend: str, write: Write, error_text: str) -> None:
        """Stage a failed send: attempts + 1, ``write.uncertain`` and the error's first line.

        ``error_text`` must already be redacted. The row keeps 300 characters of its first line.
        A row starts with ``write.attempts`` when it is inserted and this adds one to it.
        """
        self._check_usable()
        with self._lock:
            self._failures.append((backend, write, error_text, write.uncertain))
            self._work_ready.notify()

    # Committing

    def wait_durable(self, writes: Sequence[Write], timeout_s: float | None = None) -> bool:
        """Wait until every write in ``writes`` has a row, committing now if one is staged.

        Returns True when each write has a row or no longer needs one (acknowledged or dead
        lettered). Returns False when a write could not be encoded, or when ``timeout_s`` passed
        while another thread was committing.
        """
        self._check_usable()
        waiting = [write for write in writes if write.spool_id is None]
        if not waiting:
            return True
        # The commit in progress holds _db_lock until its rows are committed and numbered.
        if not self._db_lock.acquire(timeout=-1 if timeout_s is None else max(0.0, timeout_s)):
            return False
        try:
            with self._lock:
                staged = {id(entry[1]) for entry in self._staged}
            if any(id(write) in staged for write in waiting):
                self._commit_staged()
        except (sqlite3.Error, OSError, SpoolFileError) as error:
            self._log_commit_failure(error)
            return False
        finally:
            self._db_lock.release()
        with self._lock:
            return not any(id(write) in self._unencodable for write in waiting)

    def commit(self) -> None:
        """Apply all staged work in one transaction.

        On failure the work stays staged for the next commit, and the error is raised.
        """
        self._check_usable()
        self._commit_staged()

    def _commit_staged(self) -> None:
        with self._db_lock:
            with self._lock:
                staged, self._staged = self._staged, []
                acked, self._acked = self._acked, []
                dead, self._dead = self._dead, []
                failures, self._failures = self._failures, []
            if not (staged or acked or dead or failures):
                return
            try:
                self._commit_batch(staged, acked, dead, failures)
            except BaseException:
                # Put the work back in front of anything staged meanwhile, for the next commit.
                with self._lock:
                    self._staged[:0] = staged
                    self._acked[:0] = acked
                    self._dead[:0] = dead
                    self._failures[:0] = failures
                raise

    def _commit_batch(self, staged, acked, dead, failures) -> None:
        acked_keys = {(backend, id(write)) for backend, write in acked}
        dead_keys = {(backend, id(write)) for backend, write, _ in dead}
        encoded = []
        for backend, write, created_s in staged:
            key = (backend, id(write))
            if key in acked_keys or key in dead_keys:
                continue  # acknowledged or given up before it was ever inserted
            payload = self._encode(backend, write)
            if payload is not None:
                encoded.append((backend, write, created_s, payload))

        now_s = time.time()
        new_row_ids = {}
        with self._transaction() as db:
            first_id = self._next_write_id(db)
            rows = []
            for offset, (backend, write, created_s, payload) in enumerate(encoded):
                row_id = first_id + offset
                new_row_ids[(backend, id(write))] = row_id
                rows.append((
                    row_id, backend, write.seq, write.run_id, write.operation, payload,
                    created_s, write.attempts, int(write.uncertain),
                ))
            if rows:
                db.execute(_INSERT_WRITES, (json.dumps(rows),))

            def row_id_of(backend, write):
                if write.spool_id is not None:
                    return write.spool_id
                return new_row_ids.get((backend, id(write)))

            self._record_failures(db, [
                (row_id_of(backend, write), uncertain, text)
                for backend, write, text, uncertain in failures
                if row_id_of(backend, write) is not None
            ])
            for backend, write, reason in dead:
                row_id = row_id_of(backend, write)
                if row_id is not None:
                    self._move_to_dead_letters(db, row_id, reason, now_s)
                else:
                    self._insert_dead_letter(db, backend, write, reason, now_s)
            self._delete_rows(db, [
                row_id_of(backend, write)
                for backend, write in acked
                if row_id_of(backend, write) is not None
            ])

        # Row ids become visible only after the transaction committed.
        for backend, write, _, _ in encoded:
            write.spool_id = new_row_ids[(backend, id(write))]
        settled = [write for _, write in acked] + [write for _, write, _ in dead]
        with self._lock:
            for write in settled:
                write.spool_id = None
                self._unencodable.pop(id(write), None)

    @staticmethod
    def _next_write_id(db) -> int:
        # Row ids are assigned here rather than by SQLite so that they are known for every row
        # of an executemany. sqlite_sequence contains the largest id the table ever had.
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'writes'").fetchone()
        return (row[0] if row else 0) + 1

    def _encode(self, backend: str, write: Write) -> str | None:
        try:
            return encode_write(write)
        except TypeError as error:
            with self._lock:
                self._unencodable[id(write)] = write
                first = write.operation not in self._logged_unencodable_operations
                self._logged_unencodable_operations.add(write.operation)
            if first:
                _logger.error(
                    "Spool %s: a %s write (seq=%s run_id=%s backend=%s) cannot be stored and "
                    "is kept only in memory, so a crash would lose it. Further %s writes that "
                    "cannot be stored are not logged: %s",
                    self.path, write.operation, write.seq, write.run_id or "-", backend,
                    write.operation, error,
                )
            return None

    # The group commit thread

    def _start_committer(self) -> None:
        self._thread = threading.Thread(
            target=self._run_committer, name="mlflow-azdual-spool-commit", daemon=True
        )
        self._thread.start()

    def _has_staged_work(self) -> bool:
        return bool(self._staged or self._acked or self._dead or self._failures)

    def _run_committer(self) -> None:
        while True:
            with self._lock:
                while not self._has_staged_work() and not self._stopping:
                    self._work_ready.wait()
                if self._stopping:
                    return
            # Wait one interval first, so that one transaction takes the whole group.
            if self._stop.wait(self.commit_interval_s):
                return
            try:
                self._commit_staged()
            except (sqlite3.Error, OSError, SpoolFileError) as error:
                self._log_commit_failure(error)

    def _log_commit_failure(self, error: Exception) -> None:
        now_s = time.monotonic()
        last_s = self._last_failure_log_s
        if last_s is not None and now_s - last_s < COMMIT_FAILURE_LOG_INTERVAL_S:
            self._suppressed_failure_logs += 1
            return
        _logger.error(
            "Spool %s: commit failed, and the staged writes stay in memory for the next try "
            "(%d similar failures not logged): %r",
            self.path, self._suppressed_failure_logs, error,
        )
        self._last_failure_log_s = now_s
        self._suppressed_failure_logs = 0

    def close(self, remove_if_empty: bool = True) -> None:
        """Commit staged work and close, removing the files if asked and no rows are left.

        In a forked child this does nothing, because the file belongs to the parent.
        """
        if self._inherited or self._closed:
            return
        with self._lock:
            self._stopping = True
            self._work_ready.notify_all()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._commit_staged()
        except BaseException:
            with self._db_lock:
                self._close_files(remove_if_empty=False)
            raise
        with self._db_lock:
            self._close_files(remove_if_empty)


# Replay of another process's file


class ClaimedSpool(_SpoolDatabase):
    """An orphaned spool file, locked by this process for replay. Thread-safe.

    Every method applies its change in its own transaction at once. Errors that show the file
    is corrupt raise SpoolFileError.
    """

    def __init__(self, path, connection, lock_fd, meta: dict):
        super().__init__(path, connection, lock_fd)
        self.meta = meta

    @classmethod
    def claim(cls, path: str) -> ClaimedSpool | None:
        """Lock and open the spool file ``path``.

        Returns None while another process holds the lock, or when the file no longer exists.

        Raises SpoolFileError, with the lock released, for a file that is not a spool of a
        format version this code reads, or that is corrupt.
        """
        lock_fd = _try_lock(path + LOCK_SUFFIX, create=True)
        if lock_fd is None:
            return None
        if not os.path.exists(path):
            # Its owner closed it empty and removed it after this process listed it.
            _unlink_if_exists(path + LOCK_SUFFIX)
            os.close(lock_fd)
            return None

        connection = None
        try:
            # The check uses a read-only connection, because a read-write one can change a bad
            # file. SQLite deletes a -wal file beside a database that is not in WAL mode, and
            # that -wal may be the evidence of what went wrong.
            meta = _check_file(path)
            try:
                connection = _connect(path, "rw")
                _use_wal(connection)
            except sqlite3.Error as error:
                raise SpoolFileError(path, f"cannot be opened for writing ({error})") from None
        except BaseException:
            if connection is not None:
                connection.close()
            os.close(lock_fd)
            raise
        _make_side_files_private(path)
        return cls(path, connection, lock_fd, meta)

    def ack_ids(self, ids: Iterable[int]) -> None:
        """Delete the rows ``ids``, whose writes their backend acknowledged."""
        self._check_usable()
        with self._db_lock, self._corruption_as_file_error(), self._transaction() as db:
            self._delete_rows(db, ids)

    # NOTE: these two take (write, backend), the reverse of Spool's (backend, write), and
    # mlflow_azdual.replay calls them in this order.

    def dead_letter(self, write: Write, backend: str, reason: str) -> None:
        """Move the row of ``write`` to dead_letters with ``reason``."""
        self._check_usable()
        with self._db_lock, self._corruption_as_file_error(), self._transaction() as db:
            if write.spool_id is None:
                self._insert_dead_letter(db, backend, write, reason, time.time())
            else:
                self._move_to_dead_letters(db, write.spool_id, reason, time.time())
        write.spool_id = None

    def record_failure(self, write: Write, backend: str, error_text: str) -> None:
        """Add one to the row's attempts, and store ``write.uncertain`` and the error text.

        Only the first line of ``error_text``, up to 300 characters, is kept. Pass redacted text.
        """
        self._check_usable()
        if write.spool_id is None:
            return
        with self._db_lock, self._corruption_as_file_error(), self._transaction() as db:
            self._record_failures(db, [(write.spool_id, write.uncertain, error_text)])

    def close(self, remove_if_empty: bool = True) -> None:
        """Close and release the lock, removing the files if asked and no rows are left."""
        if self._inherited or self._closed:
            return
        with self._db_lock:
            self._close_files(remove_if_empty)


def orphan_files(directory: str) -> list:
    """Return the spool files in ``directory`` whose lock no live process holds.

    NOTE: the check takes each free lock for a moment, so a ``ClaimedSpool.claim`` of the same
    file by another process at that moment returns None. Its caller should try again later.
    """
    own = {spool.path for spool in list(_open_spools)}
    return [
        path
        for path in _spool_files(directory)
        if path not in own and not _lock_is_held(path + LOCK_SUFFIX)
    ]


def quarantine(path: str) -> str:
    """Rename a bad spool file and its -wal and -shm to ``<path>.corrupt-<UTC time>``.

    Returns the new path of the database file.

    Raises RuntimeError when a live process holds the file's lock.
    """
    lock_path = path + LOCK_SUFFIX
    lock_fd = _try_lock(lock_path, create=False)
    if lock_fd is None and os.path.exists(lock_path):
        raise RuntimeError(
            f"Cannot quarantine spool file {path}: a live process holds its lock {lock_path}. "
            "Stop that process first."
        )
    try:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        new_path = f"{path}.corrupt-{stamp}"
        counter = 1
        while os.path.exists(new_path):
            counter += 1
            new_path = f"{path}.corrupt-{stamp}-{counter}"
        os.rename(path, new_path)
        for suffix in SIDE_FILE_SUFFIXES:
            with contextlib.suppress(FileNotFoundError):
                os.rename(path + suffix, new_path + suffix)
        if lock_fd is not None:
            _unlink_if_exists(lock_path)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    _logger.warning("Spool file %s was quarantined as %s.", path, new_path)
    return new_path


# Status, for the command line


def _read_file_status(path: str) -> tuple:
    """Read (meta, counts) of a spool file read-only, or raise SpoolFileError for a bad file."""
    connection = _open_read_only(path)
    try:
        meta = _read_meta(connection, path, check_integrity=False)
        try:
            return meta, _read_counts(connection)
        except sqlite3.DatabaseError as error:
            raise SpoolFileError(path, f"is corrupt ({error})") from None
    finally:
        connection.close()


def directory_status(directory: str) -> dict:
    """Return totals per backend across the spool files of ``directory``, and each file.

    ``backends`` maps a backend to ``pending``, ``oldest_age_s``, ``attempts`` and
    ``dead_letters``. ``files`` lists ``path``, ``pid``, ``hostname``, ``alive`` (its lock is
    held), ``counts`` and ``error``, the SpoolFileError message of a bad file, else None.
    """
    now_s = time.time()
    backends = {}
    files = []
    for path in _spool_files(directory):
        entry = {
            "path": path, "pid": None, "hostname": None,
            "alive": _lock_is_held(path + LOCK_SUFFIX), "counts": {}, "error": None,
        }
        files.append(entry)
        try:
            meta, counts = _read_file_status(path)
        except SpoolFileError as error:
            entry["error"] = str(error)
            continue
        entry["pid"] = int(meta["pid"]) if meta.get("pid", "").isdigit() else None
        entry["hostname"] = meta.get("hostname")
        entry["counts"] = counts
        for backend, count in counts.items():
            total = backends.setdefault(
                backend, {"pending": 0, "oldest_age_s": None, "attempts": 0, "dead_letters": 0}
            )
            total["pending"] += count["pending"]
            total["attempts"] += count["attempts"] or 0
            total["dead_letters"] += count["dead_letters"]
            if count["oldest_created_s"] is not None:
                age_s = max(0.0, now_s - count["oldest_created_s"])
                total["oldest_age_s"] = max(total["oldest_age_s"] or 0.0, age_s)
    return {"backends": backends, "files": files}


def list_dead_letters(directory: str) -> list:
    """Return the dead letters of every readable spool file in ``directory``, file by file.

    Each is a dict of ``backend``, ``run_id``, ``operation``, ``reason``, ``created_s`` and
    ``file``. A bad file is skipped with a WARNING, and ``directory_status`` reports it.
    """
    letters = []
    for path in _spool_files(directory):
        try:
            connection = _connect(path, "ro")
        except sqlite3.Error as error:
            _logger.warning(
                "Spool file %s cannot be opened, so its dead letters are not listed: %s",
                path, error,
            )
            continue
        try:
            _read_meta(connection, path, check_integrity=False)
            rows = connection.execute(
                "SELECT backend, run_id, operation, reason, created_s FROM dead_letters "
                "ORDER BY id"
            ).fetchall()
        except (SpoolFileError, sqlite3.DatabaseError) as error:
            _logger.warning("Spool file %s is skipped in the dead letter list: %s", path, error)
            continue
        finally:
            connection.close()
        for backend, run_id, operation, reason, created_s in rows:
            letters.append({
                "backend": backend, "run_id": run_id, "operation": operation,
                "reason": reason, "created_s": created_s, "file": path,
            })
    return letters


def _disown_spools_after_fork() -> None:
    for spool in list(_open_spools):
        spool._disown_after_fork()
    _open_spools.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disown_spools_after_fork)
