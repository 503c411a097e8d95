"""collect_experiences.py: nothing the worker stored is lost locally, and no run starts on a bad input.

Refusals happen before the worker is called (the matrix points at a port nobody listens on: a refusal that came
later would exit 3) and leave every file byte-identical. Mid-run record failures are real: a log that is
/dev/full, a file-size limit (RLIMIT_FSIZE, as `ulimit -f` sets), a --db locked by another connection. Malformed
worker replies come from tests/fault_worker.py's FaultProxy in front of a real saige_worker.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import resource
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import saige_db
from conftest import ROOT, assert_refused, run, snapshot
from fault_worker import FaultProxy, serve

SCRIPT = "collect_experiences.py"
FAST = ("--retries", "2", "--timeout", "1")
EXIT_SINK = 5
WAIT_S = 60  # the longest any test waits for a collector or a worker


# --- helpers -----------------------------------------------------------------------------------------------
def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("SAIGE_WORKER_TOKEN", "SAIGE_DEBUG", "OPENAI_API_KEY")}


@contextlib.contextmanager
def worker_process(db: Path):
    """saige_worker.py on `db` (--init, --port 0); yields its URL."""
    cmd = [sys.executable, str(ROOT / "saige_worker.py"), "--db", str(db), "--init", "--port", "0", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=clean_env())
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
    try:
        deadline = time.monotonic() + 20
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "the worker exited before printing its URL"
            match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
            if match:
                break
        yield match.group(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def worker(tmp_path):
    db = tmp_path / "worker.db"
    with worker_process(db) as url:
        yield url, db


@pytest.fixture(scope="module")
def shared_worker(tmp_path_factory):
    db = tmp_path_factory.mktemp("shared") / "worker.db"
    with worker_process(db) as url:
        yield url, db


def collect(url: str, *args, **kwargs) -> subprocess.CompletedProcess:
    return run(SCRIPT, "--worker-url", url, *args, env=clean_env(), timeout=kwargs.pop("timeout", WAIT_S), **kwargs)


def popen(url: str, *args, **kwargs) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / SCRIPT), "--worker-url", url, *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(), **kwargs)


def worker_pairs(db: Path) -> Counter:
    conn = sqlite3.connect(db)
    try:
        return Counter(conn.execute("SELECT scenario_id, ai_response FROM experiences").fetchall())
    finally:
        conn.close()


def db_pairs(db: Path) -> Counter:
    """(worker scenario id, answer) of a local --db: a fresh --db keeps the worker's scenario ids."""
    if not db.exists():
        return Counter()
    return worker_pairs(db)


def strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"non-JSON number {constant} in a record")

    return json.loads(text, parse_constant=refuse)


def log_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [strict_json(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def log_pairs(path: Path) -> Counter:
    return Counter((e["scenario_id"], e["response"]) for e in log_lines(path) if isinstance(e.get("outcome"), dict))


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    while not (path.exists() and path.read_text(errors="replace").count("\n") >= n):
        assert time.monotonic() < deadline and proc.poll() is None, "no episodes were recorded"
        time.sleep(0.02)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=WAIT_S)
    return proc.returncode, out, err


def resume_args(stderr: str) -> list[str]:
    """The resume command the collector printed, as arguments after the script."""
    match = re.search(r"resume with: (.+)$", stderr, re.M)
    assert match, stderr
    words = shlex.split(match.group(1))
    assert words[0] == "python" and words[1].endswith(SCRIPT)
    return words[2:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the bad-input matrix: refused before the worker is called, every file byte-identical -------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """The files the rows refer to: a SAIGE db, a JSONL log, an adapter and a model folder, odd databases. Built
    once: every row must leave them as they are, which each row checks."""
    d = tmp_path_factory.mktemp("matrix")
    saige_db.build_demo(d / "saige.db")
    (d / "runs.jsonl").write_text('{"scenario_id": 1, "response": "hi", "outcome": {"total_harm": 0.1}}\n')
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": "x", "r": 8}')
    (d / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (d / "model").mkdir()
    (d / "model" / "config.json").write_text("{}")
    (d / "model" / "model.safetensors").write_bytes(b"\0" * 64)
    (d / "not-adapter").mkdir()
    (d / "not-model").mkdir()
    (d / "not-model" / "weights.bin").write_bytes(b"\0")
    os.link(d / "saige.db", d / "hardlink.jsonl")
    os.symlink(d / "saige.db", d / "symlink.jsonl")
    conn = sqlite3.connect(d / "odd.db")
    conn.execute("CREATE TABLE experiences (id INTEGER PRIMARY KEY, note TEXT)")
    conn.commit()
    conn.close()
    (d / "corrupt.db").write_bytes(b"SQLite format 3\x00" + b"\xff" * 2000)
    (d / "locked.db").write_bytes((d / "saige.db").read_bytes())
    return d


E = ("--backend", "echo")
T = ("--backend", "transformers")
MATRIX = [  # id, arguments ({d} is the test folder), exit code, stderr pattern
    ("jsonl-is-db", [*E, "--db", "{d}/saige.db", "--output-jsonl", "{d}/saige.db"], 2, r"same file"),
    ("jsonl-hardlink-to-db", [*E, "--db", "{d}/saige.db", "--output-jsonl", "{d}/hardlink.jsonl"], 2, r"same file"),
    ("jsonl-symlink-to-db", [*E, "--db", "{d}/saige.db", "--output-jsonl", "{d}/symlink.jsonl"], 2, r"same file"),
    ("jsonl-is-a-sqlite-db", [*E, "--output-jsonl", "{d}/saige.db"], 2, r"is a SQLite database, not a JSONL"),
    ("db-is-a-jsonl-log", [*E, "--db", "{d}/runs.jsonl"], 2, r"--db .*runs.jsonl is not a SQLite database"),
    ("db-is-the-journal", [*E, "--db", "{d}/runs.jsonl.inflight", "--output-jsonl", "{d}/runs.jsonl"], 2,
     r"same file"),
    ("db-is-adapter-weights", [*T, "--adapter", "{d}/adapter", "--db", "{d}/adapter/adapter_model.safetensors"], 2,
     r"same file as --adapter's adapter_model.safetensors"),
    ("jsonl-is-adapter-config", [*T, "--adapter", "{d}/adapter", "--output-jsonl", "{d}/adapter/adapter_config.json"],
     2, r"same file as --adapter's adapter_config.json"),
    ("jsonl-is-model-weights", [*T, "--model", "{d}/model", "--output-jsonl", "{d}/model/model.safetensors"], 2,
     r"same file as --model's model.safetensors"),
    ("db-folder-missing", [*E, "--db", "{d}/nope/x.db"], 2, r"directory does not exist"),
    ("jsonl-is-a-folder", [*E, "--output-jsonl", "{d}/adapter"], 2, r"is a folder"),
    ("jsonl-folder-unwritable", [*E, "--output-jsonl", "/proc/runs.jsonl"], 2, r"cannot write in folder /proc"),
    ("db-locked", [*E, "--db", "{d}/locked.db"], 2, r"locked.db is locked by another program"),
    ("db-without-saige-columns", [*E, "--db", "{d}/odd.db"], 2, r"without the SAIGE columns"),
    ("db-corrupt", [*E, "--db", "{d}/corrupt.db"], 2, r"not a usable SQLite database"),
    ("resume-from-a-device", [*E, "--output-jsonl", "/dev/null", "--resume"], 2, r"not a regular file"),
    ("episodes-absurd", [*E, "--episodes", str(10**30)], 2, r"--episodes: must be at most"),
    ("episodes-negative", [*E, "--episodes", "-3"], 2, r"--episodes: must be a positive integer"),
    ("concurrency-zero", [*E, "--concurrency", "0"], 2, r"--concurrency: must be a positive integer"),
    ("concurrency-huge", [*E, "--concurrency", "100000"], 2, r"--concurrency: must be at most 256"),
    ("timeout-negative", [*E, "--timeout", "-1"], 2, r"--timeout: must be more than 0"),
    ("timeout-nan", [*E, "--timeout", "nan"], 2, r"--timeout: must be a finite number"),
    ("timeout-inf", [*E, "--timeout", "inf"], 2, r"--timeout: must be a finite number"),
    ("temperature-nan", [*E, "--temperature", "nan"], 2, r"--temperature: must be a finite number"),
    ("temperature-inf", [*E, "--temperature", "inf"], 2, r"--temperature: must be a finite number"),
    ("sleep-inf", [*E, "--sleep", "inf"], 2, r"--sleep: must be a finite number"),
    ("retries-absurd", [*E, "--retries", "1000000000"], 2, r"--retries: must be at most"),
    ("batch-size-absurd", [*E, "--batch-size", str(10**12)], 2, r"--batch-size: must be at most"),
    ("max-new-tokens-absurd", [*E, "--max-new-tokens", str(10**30)], 2, r"--max-new-tokens: must be at most"),
    ("samples-absurd", [*E, "--samples-per-scenario", str(10**30)], 2, r"--samples-per-scenario: must be at most"),
    ("model-version-absurd", [*E, "--db", "{d}/saige.db", "--model-version", str(10**30)], 2,
     r"--model-version: must be at most"),
    ("seed-negative", [*E, "--seed", "-1"], 2, r"--seed: must be 0 or more"),
    ("adapter-without-config", [*T, "--adapter", "{d}/not-adapter"], 2, r"no adapter_config.json"),
    ("model-path-missing", [*T, "--model", "{d}/missing-model"], 2, r"--model .*missing-model: no such folder"),
    ("model-folder-without-config", [*T, "--model", "{d}/not-model"], 2, r"folder without config.json"),
    ("url-without-host", [*E, "--worker-url", "http://:8787"], 2, r"names no host"),
    ("url-bad-port", [*E, "--worker-url", "http://localhost:99999"], 2, r"not a valid URL"),
]  # fmt: skip


@pytest.mark.parametrize("args, code, pattern", [m[1:] for m in MATRIX], ids=[m[0] for m in MATRIX])
def test_bad_input_matrix(files, args, code, pattern):
    d = files
    argv = [a.replace("{d}", str(d)) for a in args]
    watched = [d / n for n in ("saige.db", "runs.jsonl", "odd.db", "corrupt.db", "locked.db", "runs.jsonl.inflight")]
    watched += [d / "adapter" / "adapter_model.safetensors", d / "adapter" / "adapter_config.json"]
    watched += [d / "model" / "model.safetensors", d / "nope" / "x.db"]
    before = snapshot(*watched)
    holder = None
    if "locked.db" in " ".join(argv):
        holder = sqlite3.connect(d / "locked.db", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
    try:
        url = f"http://127.0.0.1:{free_port()}"  # nobody listens: a refusal made after calling it would exit 3
        if "--worker-url" in argv:
            result = run(SCRIPT, *argv, "--episodes", "2") if "--episodes" not in argv else run(SCRIPT, *argv)
        else:
            result = run(SCRIPT, "--worker-url", url, *argv, *([] if "--episodes" in argv else ["--episodes", "2"]))
    finally:
        if holder is not None:
            holder.execute("ROLLBACK")
            holder.close()
    assert_refused(result, code, pattern, unchanged=before)
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"{SCRIPT}: error: ")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr  # argparse's usage + one


def test_jsonl_that_is_the_workers_db_is_refused_before_any_episode(worker, tmp_path):
    url, db = worker
    collect(url, "--backend", "echo", "--episodes", "1", "-q")  # the worker creates its tables on first use
    before = snapshot(db)
    result = collect(url, "--backend", "echo", "--episodes", "3", "--output-jsonl", db)
    assert_refused(result, 2, r"--output-jsonl .*worker.db is a SQLite database, not a JSONL log", unchanged=before)


# --- a record that cannot be written mid-run -----------------------------------------------------------------
def test_a_log_on_a_full_disk_stops_the_run_and_keeps_every_stored_episode_in_db(worker, tmp_path):
    url, wdb = worker
    log, db = tmp_path / "runs.jsonl", tmp_path / "local.db"
    log.symlink_to("/dev/full")  # every write: ENOSPC
    result = collect(url, "--backend", "echo", "--episodes", "40", "--concurrency", "4", "--db", db,
                     "--output-jsonl", log, "--json")  # fmt: skip
    assert "Traceback" not in result.stderr
    assert result.returncode == EXIT_SINK, result.stderr
    summary = json.loads(result.stdout)
    assert summary["record_failures"]["--output-jsonl"] == "No space left on device"
    stored = worker_pairs(wdb)
    assert 1 <= sum(stored.values()) < 40  # stopped at once, not after all 40
    assert db_pairs(db) == stored  # every experience the worker stored is in --db
    assert summary["in_db_only"] == sum(stored.values())
    assert "cannot write --output-jsonl" in result.stderr and "resume with: python" in result.stderr


def test_no_record_left_writes_a_rescue_file(worker, tmp_path):
    url, wdb = worker
    log = tmp_path / "runs.jsonl"
    log.symlink_to("/dev/full")
    result = collect(url, "--backend", "echo", "--episodes", "20", "--output-jsonl", log, "--json")
    assert "Traceback" not in result.stderr and result.returncode == EXIT_SINK, result.stderr
    rescued = Path(json.loads(result.stdout)["rescued"])
    assert rescued.parent == tmp_path and rescued.name.startswith("runs.jsonl.rescue-")
    assert log_pairs(rescued) == worker_pairs(wdb) and sum(worker_pairs(wdb).values()) >= 1
    assert "were written to" in result.stderr and str(rescued) in result.stderr


def limit_file_size(size: int):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process

    return preexec


def test_a_file_size_limit_on_the_log_then_resume_finishes_with_nothing_lost(worker, tmp_path):
    url, wdb = worker
    log, db = tmp_path / "runs.jsonl", tmp_path / "local.db"
    limit = 256 * 1024
    log.write_text(json.dumps({"note": "x" * (limit - 6000)}) + "\n")  # an old log close to the limit
    args = ["--backend", "echo", "--episodes", "30", "--concurrency", "2", "--db", db, "--output-jsonl", log]
    proc = popen(url, *args, preexec_fn=limit_file_size(limit))
    code, _, err = finish(proc)
    assert "Traceback" not in err and code == EXIT_SINK, err
    assert "File too large" in err and "resume with:" in err
    stored = worker_pairs(wdb)
    assert db_pairs(db) == stored  # the log failed; --db kept every one
    assert log.stat().st_size <= limit and log.read_text().endswith("\n")  # no half line left behind
    # the printed command, once the limit is gone, finishes the job: --episodes drops what only --db holds
    resumed = collect(url, *resume_args(err), "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert sum(worker_pairs(wdb).values()) == 30 == sum(db_pairs(db).values())
    assert db_pairs(db) == worker_pairs(wdb)


def test_a_db_locked_mid_run_stops_and_resume_heals_it(worker, tmp_path):
    url, wdb = worker
    log, db = tmp_path / "runs.jsonl", tmp_path / "local.db"
    args = ["--backend", "echo", "--episodes", "30", "--concurrency", "2", "--sleep", "0.1", "--db", db,
            "--output-jsonl", log]  # fmt: skip
    proc = popen(url, *args)
    wait_for_lines(log, 3, proc)
    holder = sqlite3.connect(db, isolation_level=None, timeout=WAIT_S)
    holder.execute("BEGIN EXCLUSIVE")  # another program holds the write lock: inserts time out
    try:
        code, _, err = finish(proc)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "Traceback" not in err and code == EXIT_SINK, err
    assert "database is locked" in err and "Episodes:" in err
    stored = worker_pairs(wdb)
    assert log_pairs(log) == stored  # every stored experience is in the log
    assert sum(db_pairs(db).values()) < sum(stored.values()) < 30
    resumed = collect(url, *resume_args(err), "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert "that " + str(db) + " was missing" in resumed.stderr
    assert log_pairs(log) == db_pairs(db) == worker_pairs(wdb) and sum(worker_pairs(wdb).values()) == 30


# --- malformed worker replies ----------------------------------------------------------------------------
GET_FAULTS = ["list-id", "string-context", "state-not-object", "not-object", "html", "truncate"]
POST_FAULTS = ["nan", "infinity", "string-scores", "harm-string", "harm-nan", "breakdown-list", "not-object", "html"]


@pytest.mark.parametrize("method, fault", [("GET", f) for f in GET_FAULTS] + [("POST", f) for f in POST_FAULTS])
def test_a_malformed_reply_is_one_failed_or_retried_episode(shared_worker, tmp_path, method, fault):
    url, wdb = shared_worker
    stored_before = sum(worker_pairs(wdb).values())
    proxy = FaultProxy(url, **{method.lower(): [fault]})
    log, db = tmp_path / "runs.jsonl", tmp_path / "local.db"
    with serve(proxy) as proxied:
        result = collect(proxied, "--backend", "echo", "--episodes", "3", "--concurrency", "1", "--db", db,
                         "--output-jsonl", log, "--json", *FAST)  # fmt: skip
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    stored = sum(worker_pairs(wdb).values()) - stored_before
    assert proxy.seen["POST", "/api/simulate-outcome"] == stored + (method == "POST" and fault == "html")  # never twice
    if method == "GET":  # a broken scenario is fetched again; a person_state that is text is kept as text
        assert result.returncode == 0, result.stderr
        assert stored == 3 == summary["scored"]
        assert sum(summary["retried_worker_answers"].values()) == (fault != "state-not-object")
    elif fault == "html":  # a proxy's error page: the worker never saw it, but that cannot be known
        assert result.returncode == 1, result.stderr
        assert summary["failures"] == {"malformed outcome JSON (may be stored)": 1} and summary["scored"] == 2
        assert "may be stored" in result.stderr and proxy.seen["POST", "/api/simulate-outcome"] == 3
    else:  # stored by the worker, the reply unusable: a failure with its reason, never re-sent
        assert result.returncode == 1, result.stderr
        assert stored == 3 and summary["scored"] == 2 and summary["stored_but_unusable"] == 1
        assert "Stored by the worker but reply unusable: 1" in result.stderr
    assert len(log_lines(log)) == summary["scored"] == sum(db_pairs(db).values())
    conn = sqlite3.connect(db)
    texts = conn.execute("SELECT harm_breakdown || IFNULL(buddhist_scores, '') FROM experiences").fetchall()
    conn.close()
    assert not any(re.search(r"NaN|Infinity", t) for (t,) in texts)


def test_a_reply_without_an_assessment_is_recorded_without_scores(shared_worker, tmp_path):
    url, _ = shared_worker
    proxy = FaultProxy(url, post=["no-assessment"])
    log, db = tmp_path / "runs.jsonl", tmp_path / "local.db"
    with serve(proxy) as proxied:
        result = collect(proxied, "--backend", "echo", "--episodes", "2", "--concurrency", "1", "--db", db,
                         "--output-jsonl", log, "--json", *FAST)  # fmt: skip
    assert result.returncode == 0, result.stderr
    conn = sqlite3.connect(db)
    scores = [r[0] for r in conn.execute("SELECT buddhist_scores FROM experiences ORDER BY id")]
    conn.close()
    assert scores[0] is None and scores[1] is not None  # the contract's buddhist_scores may be NULL


# --- signals ---------------------------------------------------------------------------------------------
def test_sigterm_stops_like_ctrl_c(worker, tmp_path):
    url, wdb = worker
    log, db = tmp_path / "runs.jsonl", tmp_path / "local.db"
    proc = popen(url, "--backend", "echo", "--episodes", "30", "--concurrency", "2", "--sleep", "0.2", "--db", db,
                 "--output-jsonl", log)  # fmt: skip
    wait_for_lines(log, 3, proc)
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    assert code == 130 and "interrupted" in err and "--resume" in err and "Traceback" not in err
    assert log_pairs(log) == db_pairs(db) == worker_pairs(wdb)
    assert not Path(str(log) + ".inflight").exists()  # a clean stop leaves no journal


@pytest.mark.parametrize("after", [3, 12])
def test_sigkill_then_resume_agrees_with_the_worker(worker, tmp_path, after):
    url, wdb = worker
    log, db = tmp_path / "runs.jsonl", tmp_path / "local.db"
    args = ["--backend", "echo", "--episodes", "40", "--concurrency", "4", "--db", db, "--output-jsonl", log]
    proc = popen(url, *args)
    wait_for_lines(log, after, proc)
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    resumed = collect(url, *args, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    stored = worker_pairs(wdb)
    assert sum(stored.values()) == 40
    assert log_pairs(log) == db_pairs(db) == stored  # same episodes everywhere, none twice
    assert not Path(str(log) + ".inflight").exists()


def test_a_log_deleted_mid_run_stops_and_db_keeps_every_stored_episode(worker, tmp_path):
    url, wdb = worker
    log, db = tmp_path / "runs.jsonl", tmp_path / "local.db"
    proc = popen(url, "--backend", "echo", "--episodes", "40", "--concurrency", "2", "--sleep", "0.1", "--db", db,
                 "--output-jsonl", log)  # fmt: skip
    wait_for_lines(log, 3, proc)
    log.unlink()  # appends would go to a file nobody can open any more
    code, _, err = finish(proc)
    assert "Traceback" not in err and code == EXIT_SINK, err
    assert "deleted or replaced" in err and "resume with:" in err
    assert db_pairs(db) == worker_pairs(wdb) and sum(worker_pairs(wdb).values()) < 40
