"""The durable spool: file layout and modes, group commit, acks, dead letters and replay."""

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from mlflow.entities import Metric, Param, RunTag

from mlflow_azdual import spool as spool_module
from mlflow_azdual.coalesce import Write
from mlflow_azdual.spool import (
    ClaimedSpool,
    Spool,
    SpoolFileError,
    directory_status,
    list_dead_letters,
    orphan_files,
    quarantine,
    spool_directory,
    spool_root,
)

PRIMARY = "databricks"
SECONDARY = "http://127.0.0.1:5001"
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def metric_write(seq, run_id="run-1", count=1):
    metrics = tuple(Metric("loss", seq + i * 0.5, 1_700_000_000_000 + seq, seq) for i in range(count))
    return Write(seq, run_id, metrics=metrics)


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def spool_dir(tmp_path):
    return str(tmp_path / "spool")


@pytest.fixture
def spool(spool_dir):
    opened = Spool.create(spool_dir, PRIMARY, SECONDARY, commit_interval_s=60)
    yield opened
    opened.close(remove_if_empty=True)


def wait_until(condition, timeout_s=2.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


# Locations


def test_spool_root_uses_option():
    assert spool_root("/data/spool") == "/data/spool"


def test_spool_root_defaults_to_home(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "DATABRICKS_LOCAL_DISK", str(tmp_path / "absent"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert spool_root(None) == str(tmp_path / "home" / ".mlflow-azdual" / "spool")


def test_spool_root_prefers_local_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "DATABRICKS_LOCAL_DISK", str(tmp_path))
    assert spool_root("") == str(tmp_path / "mlflow-azdual" / "spool")


def test_spool_directory_ignores_tokens(tmp_path):
    root = str(tmp_path)
    first = spool_directory(root, "https://u:tokenA@h.example/?token=a", SECONDARY)
    second = spool_directory(root, "https://u:tokenB@h.example/?token=b", SECONDARY)

    assert first == second
    assert "token" not in first
    assert len(os.path.basename(first)) == 16


def test_spool_directory_differs_per_backend(tmp_path):
    root = str(tmp_path)
    assert spool_directory(root, PRIMARY, SECONDARY) != spool_directory(root, PRIMARY, "file:/x")


# Files and modes


def test_modes_private_with_umask_zero(tmp_path):
    directory = str(tmp_path / "a" / "b")
    previous = os.umask(0)
    try:
        created = Spool.create(directory, PRIMARY, SECONDARY, commit_interval_s=60)
        created.add("secondary", metric_write(1))
        created.commit()

        assert mode_of(tmp_path / "a") == 0o700
        assert mode_of(directory) == 0o700
        assert mode_of(created.path) == 0o600
        assert mode_of(created.path + "-wal") == 0o600
        assert mode_of(created.path + "-shm") == 0o600
        assert mode_of(created.path + ".lock") == 0o600
        created.close(remove_if_empty=False)
    finally:
        os.umask(previous)


def test_existing_directory_mode_kept(tmp_path):
    directory = tmp_path / "shared"
    directory.mkdir()
    os.chmod(directory, 0o711)
    Spool.create(str(directory), PRIMARY, SECONDARY).close()
    assert mode_of(directory) == 0o711


def test_file_name_and_meta(spool, spool_dir):
    name = os.path.basename(spool.path)
    meta = dict(sqlite3.connect(spool.path).execute("SELECT key, value FROM meta"))

    assert name.startswith(f"spool-{spool_module._hostname()}-{os.getpid()}-")
    assert name.endswith(".sqlite")
    assert os.path.dirname(spool.path) == spool_dir
    assert meta["format"] == "mlflow-azdual-spool"
    assert meta["version"] == "1"
    assert meta["primary"] == PRIMARY
    assert meta["pid"] == str(os.getpid())


def test_journal_mode_is_wal(spool):
    connection = sqlite3.connect(spool.path)
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_no_token_in_files(tmp_path):
    primary = "https://user:supersecrettoken@adb-1.example.net/?token=querysecret1"
    secondary = "http://127.0.0.1:5001/?sig=signaturesecret2"
    directory = spool_directory(str(tmp_path), primary, secondary)
    created = Spool.create(directory, primary, secondary, commit_interval_s=60)
    for seq in range(1, 50):
        created.add("secondary", metric_write(seq))
    created.commit()

    contents = b""
    for suffix in ("", "-wal"):
        with open(created.path + suffix, "rb") as stored:
            contents += stored.read()
    created.close(remove_if_empty=False)

    assert b"loss" in contents
    for secret in (b"supersecrettoken", b"querysecret1", b"signaturesecret2"):
        assert secret not in contents
    assert "secret" not in created.path


# Staging and committing


def test_add_commit_read_round_trip(spool):
    writes = [
        metric_write(1, count=3),
        Write(2, "run-1", params=(Param("lr", "0.1"),), tags=(RunTag("t", "v"),)),
        Write(3, "run-1", operation="delete_tag", args={"key": "t"}),
    ]
    for write in writes:
        spool.add("secondary", write)
    assert spool.read_pending("secondary") == []

    spool.commit()
    pending = spool.read_pending("secondary")

    assert [write.seq for write in pending] == [1, 2, 3]
    assert [write.spool_id for write in pending] == [write.spool_id for write in writes]
    assert all(write.spool_id is not None for write in writes)
    assert [m.value for m in pending[0].metrics] == [1.0, 1.5, 2.0]
    assert pending[1].params[0].value == "0.1"
    assert pending[2].operation == "delete_tag"
    assert pending[2].args == {"key": "t"}


def test_read_pending_pages_by_id(spool):
    for seq in range(1, 11):
        spool.add("secondary", metric_write(seq))
    spool.commit()

    first = spool.read_pending("secondary", limit=4)
    second = spool.read_pending("secondary", after_id=first[-1].spool_id, limit=100)

    assert [write.seq for write in first] == [1, 2, 3, 4]
    assert [write.seq for write in second] == [5, 6, 7, 8, 9, 10]


def test_backends_are_separate(spool):
    spool.add("primary", metric_write(1))
    spool.add("secondary", metric_write(2))
    spool.commit()
    assert [write.seq for write in spool.read_pending("primary")] == [1]
    assert [write.seq for write in spool.read_pending("secondary")] == [2]


def test_ack_removes_rows(spool):
    writes = [metric_write(seq) for seq in range(1, 4)]
    for write in writes:
        spool.add("secondary", write)
    spool.commit()

    spool.ack("secondary", writes[:2])
    spool.commit()

    assert [write.seq for write in spool.read_pending("secondary")] == [3]
    assert writes[0].spool_id is None


def test_ack_before_commit_never_inserts(spool):
    write = metric_write(1)
    spool.add("secondary", write)
    spool.ack("secondary", [write])
    spool.commit()

    assert spool.read_pending("secondary") == []
    assert write.spool_id is None
    assert spool.counts() == {}


def test_ack_other_backend_keeps_row(spool):
    write = metric_write(1)
    spool.add("secondary", write)
    spool.ack("primary", [write])
    spool.commit()
    assert len(spool.read_pending("secondary")) == 1


def test_record_failure_updates_row(spool):
    write = metric_write(1)
    spool.add("secondary", write)
    spool.commit()

    write.uncertain = True
    spool.record_failure("secondary", write, "HTTP 503\nTraceback ...")
    spool.record_failure("secondary", write, "x" * 500)
    spool.commit()
    replayed = spool.read_pending("secondary")[0]
    last_error = sqlite3.connect(spool.path).execute("SELECT last_error FROM writes").fetchone()[0]

    assert replayed.attempts == 2
    assert replayed.uncertain is True
    assert last_error == "x" * 300


def test_record_failure_first_line_only(spool):
    write = metric_write(1)
    spool.add("secondary", write)
    spool.record_failure("secondary", write, "HTTP 503 Service Unavailable\nTraceback ...")
    spool.commit()
    last_error = sqlite3.connect(spool.path).execute("SELECT last_error FROM writes").fetchone()[0]
    assert last_error == "HTTP 503 Service Unavailable"


def test_dead_letter_moves_row(spool, spool_dir):
    write = metric_write(1)
    spool.add("secondary", write)
    spool.commit()

    spool.dead_letter("secondary", write, "rejected: INVALID_PARAMETER_VALUE")
    spool.commit()
    letters = list_dead_letters(spool_dir)

    assert spool.read_pending("secondary") == []
    assert len(letters) == 1
    assert letters[0]["reason"] == "rejected: INVALID_PARAMETER_VALUE"
    assert letters[0]["backend"] == "secondary"
    assert letters[0]["run_id"] == "run-1"
    assert letters[0]["operation"] == "log_batch"
    assert letters[0]["file"] == spool.path


def test_dead_letter_before_commit(spool, spool_dir):
    write = metric_write(1)
    spool.add("secondary", write)
    spool.dead_letter("secondary", write, "gave up")
    spool.commit()

    assert spool.read_pending("secondary") == []
    assert spool.counts()["secondary"]["dead_letters"] == 1
    payload = sqlite3.connect(spool.path).execute("SELECT payload FROM dead_letters").fetchone()[0]
    assert "loss" in payload


def test_dead_letter_unencodable_write(spool):
    write = Write(1, "run-1", operation="log_artifact", args={"blob": b"raw"})
    spool.dead_letter("secondary", write, "gave up")
    spool.commit()
    row = sqlite3.connect(spool.path).execute("SELECT payload, reason FROM dead_letters").fetchone()

    assert row[0] is None
    assert row[1].startswith("gave up (payload not stored: Cannot spool args['blob']")


def test_counts_per_backend(spool):
    before_s = time.time()
    for seq in range(1, 4):
        spool.add("secondary", metric_write(seq))
    spool.add("primary", metric_write(4))
    spool.commit()
    failed = metric_write(5)
    spool.add("secondary", failed)
    spool.record_failure("secondary", failed, "timeout")
    spool.dead_letter("primary", metric_write(6), "rejected")
    spool.commit()

    counts = spool.counts()

    assert counts["secondary"]["pending"] == 4
    assert counts["secondary"]["attempts"] == 1
    assert counts["secondary"]["dead_letters"] == 0
    assert counts["secondary"]["oldest_created_s"] >= before_s
    assert counts["primary"]["pending"] == 1
    assert counts["primary"]["dead_letters"] == 1


def test_wait_durable_commits(spool):
    writes = [metric_write(seq) for seq in range(1, 4)]
    for write in writes:
        spool.add("secondary", write)

    assert spool.wait_durable(writes, timeout_s=5) is True
    assert all(write.spool_id is not None for write in writes)
    assert len(spool.read_pending("secondary")) == 3


def test_wait_durable_unencodable_write(spool, caplog):
    write = Write(1, "run-1", operation="log_artifact", args={"blob": b"raw"})
    spool.add("secondary", write)

    assert spool.wait_durable([write], timeout_s=5) is False
    assert write.spool_id is None
    assert "cannot be stored" in caplog.text


def test_group_commit_without_explicit_commit(spool_dir):
    live = Spool.create(spool_dir, PRIMARY, SECONDARY, commit_interval_s=0.05)
    try:
        write = metric_write(1)
        live.add("secondary", write)
        assert wait_until(lambda: write.spool_id is not None, timeout_s=2.0)
        assert len(live.read_pending("secondary")) == 1
    finally:
        live.close()


def test_concurrent_add_and_ack(spool_dir):
    live = Spool.create(spool_dir, PRIMARY, SECONDARY, commit_interval_s=0.005)
    thread_count = 8
    writes_per_thread = 500

    def produce(thread_index):
        writes = []
        for index in range(writes_per_thread):
            write = metric_write(thread_index * writes_per_thread + index + 1)
            live.add("secondary", write)
            writes.append(write)
            if index % 50 == 49:
                live.ack("secondary", writes[-50:-25])

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(thread_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    live.close(remove_if_empty=False)

    claimed = ClaimedSpool.claim(live.path)
    seqs = [write.seq for write in claimed.read_pending("secondary", limit=10_000)]
    claimed.close(remove_if_empty=False)
    # Each thread acknowledged the first 25 of every 50 writes it added.
    expected = [
        thread_index * writes_per_thread + index + 1
        for thread_index in range(thread_count)
        for index in range(writes_per_thread)
        if index % 50 >= 25
    ]

    assert len(seqs) == len(set(seqs))
    assert sorted(seqs) == expected


def test_close_removes_empty_file(spool_dir):
    live = Spool.create(spool_dir, PRIMARY, SECONDARY)
    write = metric_write(1)
    live.add("secondary", write)
    live.commit()
    live.ack("secondary", [write])
    live.close()

    for suffix in ("", "-wal", "-shm", ".lock"):
        assert not os.path.exists(live.path + suffix)


def test_close_keeps_pending_file(spool_dir):
    live = Spool.create(spool_dir, PRIMARY, SECONDARY, commit_interval_s=60)
    live.add("secondary", metric_write(1))
    live.close()

    assert os.path.exists(live.path)
    claimed = ClaimedSpool.claim(live.path)
    assert [write.seq for write in claimed.read_pending("secondary")] == [1]
    claimed.close(remove_if_empty=False)


def test_closed_spool_rejects_add(spool_dir):
    live = Spool.create(spool_dir, PRIMARY, SECONDARY)
    live.close()
    with pytest.raises(RuntimeError, match="closed"):
        live.add("secondary", metric_write(1))


def test_undecodable_row_becomes_dead_letter(spool):
    spool.add("secondary", metric_write(1))
    spool.add("secondary", metric_write(2))
    spool.commit()
    editor = sqlite3.connect(spool.path)
    editor.execute("UPDATE writes SET payload = '{broken' WHERE seq = 1")
    editor.commit()
    editor.close()

    assert [write.seq for write in spool.read_pending("secondary")] == [2]
    assert spool.counts()["secondary"]["dead_letters"] == 1


def test_add_and_commit_cost(spool_dir):
    live = Spool.create(spool_dir, PRIMARY, SECONDARY, commit_interval_s=3600)
    writes = [metric_write(seq) for seq in range(1, 10_001)]

    # The first add starts the commit thread, so it is not timed.
    live.add("secondary", writes[0])
    start_s = time.perf_counter()
    for write in writes[1:]:
        live.add("secondary", write)
    add_s = time.perf_counter() - start_s

    start_s = time.perf_counter()
    live.commit()
    commit_s = time.perf_counter() - start_s

    start_s = time.perf_counter()
    live.ack("secondary", writes)
    live.commit()
    ack_s = time.perf_counter() - start_s

    print(
        f"\nspool add: {add_s / (len(writes) - 1) * 1e6:.2f} us per write; "
        f"commit of 10,000 one-metric writes: {commit_s * 1e3:.1f} ms; "
        f"ack and commit of them: {ack_s * 1e3:.1f} ms"
    )
    assert live.counts() == {}
    live.close()


# Fork


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_fresh_spool(spool, spool_dir):
    spool.add("secondary", metric_write(1))
    spool.commit()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        # The child always leaves through os._exit, so that it never runs pytest's code.
        code = 2
        try:
            try:
                spool.add("secondary", metric_write(2))
                code = 1
            except RuntimeError:
                spool.close()
                child = Spool.create(spool_dir, PRIMARY, SECONDARY)
                os.write(write_end, child.path.encode())
                child.close()
                code = 0
        finally:
            os._exit(code)

    os.close(write_end)
    child_path = os.read(read_end, 4096).decode()
    os.close(read_end)
    _, status = os.waitpid(pid, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    assert child_path != spool.path
    assert os.path.exists(spool.path)
    assert spool.path not in orphan_files(spool_dir)
    assert len(spool.read_pending("secondary")) == 1


# Replay of another process's file

CHILD_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from mlflow.entities import Metric
    from mlflow_azdual.coalesce import Write
    from mlflow_azdual.spool import Spool

    spool = Spool.create(sys.argv[1], "databricks", "http://127.0.0.1:5001", 60)
    for seq in range(1, 101):
        metric = Metric("loss", seq * 0.5, 1_700_000_000_000 + seq, seq)
        spool.add("secondary", Write(seq, "run-1", metrics=(metric,)))
    spool.add("primary", Write(101, "run-1", operation="delete_tag", args={"key": "k"}))
    spool.commit()
    print(spool.path, flush=True)
    time.sleep(600)
    """
)


@pytest.fixture
def child_spool(spool_dir):
    environment = dict(os.environ, PYTHONPATH=REPOSITORY)
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD_SCRIPT, spool_dir],
        stdout=subprocess.PIPE, text=True, env=environment,
    )
    path = process.stdout.readline().strip()
    assert path, f"the child process exited with {process.poll()} before printing its spool path"
    yield process, path
    if process.poll() is None:
        process.kill()
    process.wait()
    process.stdout.close()


def test_live_file_not_claimable(child_spool, spool_dir):
    process, path = child_spool

    assert os.path.exists(path)
    assert process.poll() is None
    assert ClaimedSpool.claim(path) is None
    assert orphan_files(spool_dir) == []
    assert directory_status(spool_dir)["files"][0]["alive"] is True


def test_killed_process_leaves_orphan(child_spool, spool_dir):
    process, path = child_spool
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    assert orphan_files(spool_dir) == [path]
    claimed = ClaimedSpool.claim(path)
    assert claimed is not None
    secondary = claimed.read_pending("secondary", limit=1000)
    primary = claimed.read_pending("primary")

    assert [write.seq for write in secondary] == list(range(1, 101))
    assert secondary[-1].metrics[0].value == 50.0
    assert [write.operation for write in primary] == ["delete_tag"]
    assert claimed.meta["pid"] == str(process.pid)
    assert claimed.meta["secondary"] == "http://127.0.0.1:5001"
    assert orphan_files(spool_dir) == []
    claimed.close(remove_if_empty=False)


def test_claimed_spool_drains_and_removes(child_spool, spool_dir):
    process, path = child_spool
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    claimed = ClaimedSpool.claim(path)

    secondary = claimed.read_pending("secondary")
    failed = secondary[0]
    failed.uncertain = True
    claimed.record_failure(failed, "secondary", "HTTP 500")
    claimed.ack_ids([write.spool_id for write in secondary[1:]])
    assert claimed.read_pending("secondary")[0].attempts == 1
    assert claimed.read_pending("secondary")[0].uncertain is True

    claimed.dead_letter(failed, "secondary", "rejected")
    claimed.ack_ids([write.spool_id for write in claimed.read_pending("primary")])
    assert claimed.counts() == {
        "secondary": {"pending": 0, "oldest_created_s": None, "attempts": 0, "dead_letters": 1}
    }

    claimed.close()
    assert os.path.exists(path)

    claimed = ClaimedSpool.claim(path)
    with sqlite3.connect(path) as editor:
        editor.execute("DELETE FROM dead_letters")
    claimed.close()
    assert not os.path.exists(path)
    assert not os.path.exists(path + ".lock")


def test_directory_status_totals(child_spool, spool_dir, spool):
    process, path = child_spool
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    spool.add("secondary", metric_write(1))
    spool.commit()

    status = directory_status(spool_dir)
    files = {entry["path"]: entry for entry in status["files"]}

    assert status["backends"]["secondary"]["pending"] == 101
    assert status["backends"]["primary"]["pending"] == 1
    assert status["backends"]["secondary"]["oldest_age_s"] >= 0
    assert files[path]["alive"] is False
    assert files[path]["pid"] == process.pid
    assert files[spool.path]["alive"] is True
    assert files[spool.path]["error"] is None


def test_own_file_is_not_orphan(spool, spool_dir):
    assert orphan_files(spool_dir) == []
    assert ClaimedSpool.claim(spool.path) is None


# Bad files


def write_random_file(path):
    with open(path, "wb") as bad:
        bad.write(os.urandom(8192))


def write_empty_file(path):
    open(path, "wb").close()


def write_foreign_database(path):
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE runs (id TEXT)")
    connection.commit()
    connection.close()


def write_future_spool(path):
    directory = os.path.dirname(path)
    live = Spool.create(directory, PRIMARY, SECONDARY)
    live.add("secondary", metric_write(1))
    live.close()
    os.rename(live.path, path)
    os.unlink(live.path + ".lock")
    connection = sqlite3.connect(path)
    connection.execute("UPDATE meta SET value = '99' WHERE key = 'version'")
    connection.commit()
    connection.close()


def write_truncated_spool(path):
    directory = os.path.dirname(path)
    live = Spool.create(directory, PRIMARY, SECONDARY)
    for seq in range(1, 2001):
        live.add("secondary", metric_write(seq))
    live.close()
    os.rename(live.path, path)
    os.unlink(live.path + ".lock")
    with open(path, "r+b") as stored:
        stored.truncate(os.path.getsize(path) // 2)


BAD_FILES = {
    "random": (write_random_file, "not a SQLite database or is corrupt"),
    "empty": (write_empty_file, "not a spool file"),
    "foreign": (write_foreign_database, "not a spool file"),
    "future": (write_future_spool, "format version 99"),
    "truncated": (write_truncated_spool, "corrupt"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_raises_spool_file_error(spool_dir, kind):
    os.makedirs(spool_dir, exist_ok=True)
    path = os.path.join(spool_dir, f"spool-other-1-{kind}.sqlite")
    make, problem = BAD_FILES[kind]
    make(path)

    with pytest.raises(SpoolFileError) as raised:
        ClaimedSpool.claim(path)

    assert path in str(raised.value)
    assert problem in str(raised.value)
    assert "move it aside" in str(raised.value).lower()
    assert not spool_module._lock_is_held(path + ".lock")


@pytest.mark.parametrize("kind", ["random", "foreign", "future"])
def test_bad_file_in_directory_status(spool_dir, kind):
    os.makedirs(spool_dir, exist_ok=True)
    path = os.path.join(spool_dir, f"spool-other-1-{kind}.sqlite")
    BAD_FILES[kind][0](path)

    status = directory_status(spool_dir)

    assert status["files"][0]["path"] == path
    assert path in status["files"][0]["error"]
    assert list_dead_letters(spool_dir) == []


def test_quarantine_renames_file(spool_dir):
    os.makedirs(spool_dir, exist_ok=True)
    path = os.path.join(spool_dir, "spool-other-1-bad.sqlite")
    write_random_file(path)
    write_random_file(path + "-wal")
    with pytest.raises(SpoolFileError):
        ClaimedSpool.claim(path)

    new_path = quarantine(path)

    assert new_path.startswith(path + ".corrupt-")
    assert os.path.exists(new_path)
    assert os.path.exists(new_path + "-wal")
    assert not os.path.exists(path)
    assert not os.path.exists(path + ".lock")
    assert orphan_files(spool_dir) == []


def test_quarantine_rejects_live_file(spool):
    with pytest.raises(RuntimeError, match="live process"):
        quarantine(spool.path)
