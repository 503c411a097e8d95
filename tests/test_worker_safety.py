"""saige_worker.py is safe on a laptop: bad requests, hostile web pages and bad command lines (issue 14, class 5).

Every request goes over a real socket to a real worker subprocess (raw bytes, so malformed requests reach the
server as sent). The rules under test, Ollama's defaults for a local model server:
- without a token, a request whose Origin is not local (or whose Host is not a loopback name, on a loopback bind)
  is refused with 403 and a JSON error saying how to allow it; with a token both checks are off;
- bodies over 1 MB are refused while being read (413), chunked ones included; a stalled client is dropped;
- any request with a request line gets an HTTP status line (JSON error for the bad ones), never a traceback;
  a connection that sends no request line at all (or only part of one) may be closed without an answer;
- a bad command line or database is one stderr line, exit 1 (cannot start) or 2 (usage), nothing modified.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import saige_db
from conftest import FUZZ_EXAMPLES, ROOT, assert_refused, run, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SCRIPT = "saige_worker.py"
BANK = ROOT / "data" / "scenarios.json"
STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3}) ")
CLIENT_TIMEOUT_S = 1  # --client-timeout of the workers here, so stall tests take seconds
READ_TIMEOUT_S = 10  # no answer within this is a hang
MAX_RSS_GROWTH_KB = 40_000


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SAIGE_WORKER_TOKEN", "SAIGE_DEBUG", "SAIGE_ALLOW_ORIGINS")}
    return {**env, **extra}


@dataclass
class Worker:
    proc: subprocess.Popen
    port: int
    db: Path
    log: Path

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def worker(db: Path, *args: str, env: dict | None = None, host: str = "127.0.0.1"):
    """saige_worker.py on `db` (--init, a free port, a 1 s client timeout); stopped with SIGTERM: exit 0, no
    traceback."""
    log = db.with_name(db.name + ".stderr")
    cmd = [sys.executable, str(ROOT / SCRIPT), "--db", str(db), "--init", "--port", "0", "--host", host]
    cmd += ["--client-timeout", str(CLIENT_TIMEOUT_S), *args]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env or clean_env())
    try:
        line = proc.stdout.readline()
        m = re.search(r"listening on http://(?:[\d.]+|\[[0-9a-f:]+\]):(\d+)$", line.strip())
        assert m, f"the worker did not start: {line!r}\n{log.read_text()}"
        yield Worker(proc, int(m.group(1)), db, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
    assert code == 0, f"exit {code} after SIGTERM:\n{log.read_text()}"
    assert "Traceback" not in log.read_text(), log.read_text()


def exchange(port: int, data: bytes, *, timeout: float = READ_TIMEOUT_S, half_close: bool = True) -> bytes:
    """Send raw bytes, signal the end of the request (half-close), and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (413, 403) and closed before taking all of it
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    out = b""
    with contextlib.suppress(ConnectionResetError):  # a refusal closes with unread data: RST after the answer
        while chunk := sock.recv(65536):
            out += chunk
    return out


def status(answer: bytes) -> int | None:
    m = STATUS_LINE.match(answer)
    return int(m.group(1)) if m else None


def body_of(answer: bytes) -> bytes:
    return answer.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in answer else b""


def health_ok(port: int) -> bool:
    answer = exchange(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    return status(answer) == 200


def experiences(db: Path) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT actual_harm, harm_breakdown, buddhist_scores FROM experiences").fetchall()
    finally:
        conn.close()


def rss_kb(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1))


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Worker:
    with worker(tmp_path_factory.mktemp("safety") / "saige.db") as w:
        yield w


# =========================================================================================================
# The bad-input matrix: raw HTTP requests (status, a pattern in the answer) and command lines (exit, stderr)
# =========================================================================================================
def req(head: str, body: bytes = b"", host: str | None = "127.0.0.1") -> bytes:
    """A request from its first line and headers; `host` None sends no Host header."""
    lines = head.split("\n")
    if host is not None:
        lines.insert(1, f"Host: {host}")
    return ("\r\n".join(line for line in lines if line) + "\r\n\r\n").encode("latin-1") + body


OUTCOME = b'{"scenario_id": 1, "response": "I am sorry; please call your doctor today."}'
POST = "POST /api/simulate-outcome HTTP/1.1\n"
# id: (raw request, expected status, pattern in the answer)
HTTP_ROWS = {
    "garbage-request-line": (b"GARBAGE\r\n\r\n", 400, rb"Bad request syntax"),
    "http-0.9": (b"GET /health\r\n", 400, rb"HTTP/0\.9"),
    "http-2.0": (b"GET /health HTTP/2.0\r\n\r\n", 505, rb"Invalid HTTP version"),
    "bad-version": (b"GET /health FTP/1.0\r\n\r\n", 400, rb"Bad request version"),
    "request-line-70k": (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, rb"error"),
    "header-line-70k": (req("GET /health HTTP/1.1\nX-Big: " + "b" * 70_000), 431, rb"Line too long"),
    "101-headers": (req("GET /health HTTP/1.1\n" + "".join(f"X-{i}: {i}\n" for i in range(101))), 431, rb"headers"),
    "content-length-negative": (req(POST + "Content-Length: -1"), 400, rb"Content-Length"),
    "content-length-1e9": (req(POST + "Content-Length: 1e9", OUTCOME), 400, rb"Content-Length"),
    "content-length-word": (req(POST + "Content-Length: abc", OUTCOME), 400, rb"Content-Length"),
    "content-length-superscript-2": (req(POST + "Content-Length: \xb2", OUTCOME), 400, rb"Content-Length"),
    "content-length-two-values": (
        req(POST + f"Content-Length: {len(OUTCOME)}\nContent-Length: 3", OUTCOME),
        400,
        rb"Content-Length",
    ),
    "content-length-absurd": (req(POST + "Content-Length: " + "9" * 5000), 413, rb"over 1000000"),
    "content-length-2mb": (req(POST + "Content-Length: 2000000", b"{"), 413, rb"over 1000000"),
    "body-shorter-than-length": (req(POST + f"Content-Length: {len(OUTCOME) + 50}", OUTCOME), 400, rb"ended after"),
    "chunk-size-not-hex": (req(POST + "Transfer-Encoding: chunked", b"zz\r\n{}\r\n0\r\n\r\n"), 400, rb"chunk size"),
    "chunk-size-negative": (req(POST + "Transfer-Encoding: chunked", b"-5\r\n{}\r\n0\r\n\r\n"), 400, rb"chunk size"),
    "chunk-size-huge": (req(POST + "Transfer-Encoding: chunked", b"ffffffffffff\r\n{}"), 400, rb"chunk size"),
    "chunk-over-limit": (req(POST + "Transfer-Encoding: chunked", b"f4241\r\n{"), 413, rb"over 1000000"),
    "chunk-without-crlf": (req(POST + "Transfer-Encoding: chunked", b"2\r\n{}XX0\r\n\r\n"), 400, rb"CRLF"),
    "chunked-truncated": (req(POST + "Transfer-Encoding: chunked", b'40\r\n{"scen'), 400, rb"inside a chunk"),
    "transfer-encoding-gzip": (req(POST + "Transfer-Encoding: gzip", OUTCOME), 501, rb"Transfer-Encoding"),
    "origin-evil": (req("GET /api/stats HTTP/1.1\nOrigin: https://evil.example"), 403, rb"--allow-origin"),
    "origin-null": (req("GET /api/stats HTTP/1.1\nOrigin: null"), 403, rb"Origin 'null' refused"),
    "origin-lookalike": (req("GET /health HTTP/1.1\nOrigin: http://localhost.evil.example"), 403, rb"refused"),
    "origin-evil-post-stores-nothing": (
        req(POST + f"Origin: http://evil.example\nContent-Type: text/plain\nContent-Length: {len(OUTCOME)}", OUTCOME),
        403,
        rb"--allow-origin",
    ),
    "preflight-evil": (req("OPTIONS /api/simulate-outcome HTTP/1.1\nOrigin: https://evil.example"), 403, rb"refused"),
    "expect-100-evil": (
        req(POST + "Origin: https://evil.example\nExpect: 100-continue\nContent-Length: 10"),
        403,
        rb"refused",
    ),
    "host-rebinding": (req("GET /api/stats HTTP/1.1", host="evil.example:8787"), 403, rb"DNS-rebinding"),
    "host-two-headers": (req("GET /health HTTP/1.1\nHost: evil.example"), 403, rb"DNS-rebinding"),
    "host-private-ip": (req("GET /health HTTP/1.1", host="192.168.1.5:8787"), 403, rb"--token"),
    "non-utf8-path": (b"GET /api/get-scenario?difficulty=\xff\xfe HTTP/1.1\r\nHost: localhost\r\n\r\n", 200, rb'"id"'),
    "bad-percent-encoding": (req("GET /api/get-scenario?difficulty=%zz%e9% HTTP/1.1"), 200, rb'"id"'),
    "control-chars-in-path": (b"GET /\x1b[2J\x07 HTTP/1.1\r\nHost: localhost\r\n\r\n", 404, rb"Not found"),
    "non-utf8-body-outcome": (req(POST + "Content-Length: 4", b"\xff\xfe{}"), 500, rb"Malformed JSON"),
    "non-utf8-body-score": (
        req("POST /api/score HTTP/1.1\nContent-Length: 4", b"\xff\xfe{}"),
        400,
        rb"Malformed JSON",
    ),
    "json-nested-100k": (
        req("POST /api/score HTTP/1.1\nContent-Length: 100000", b"[" * 100_000),
        400,
        rb"Malformed JSON",
    ),
    "unknown-method": (req("BREW /api/stats HTTP/1.1"), 501, rb"Unsupported method"),
    # what legitimate local callers send keeps working
    "ok-host-localhost": (req("GET /health HTTP/1.1", host="localhost:8787"), 200, rb'"status": "ok"'),
    "ok-host-ipv6-loopback": (req("GET /health HTTP/1.1", host="[::1]:8787"), 200, rb'"status": "ok"'),
    "ok-host-dot-localhost": (req("GET /health HTTP/1.1", host="saige.localhost"), 200, rb'"status": "ok"'),
    "ok-host-own-hostname": (req("GET /health HTTP/1.1", host=f"{socket.gethostname()}:8787"), 200, rb'"ok"'),
    "ok-no-host-http-1.0": (req("GET /health HTTP/1.0", host=None), 200, rb'"status": "ok"'),
    "ok-origin-localhost": (req("GET /health HTTP/1.1\nOrigin: http://localhost:5173"), 200, rb'"status": "ok"'),
    "ok-origin-127": (req("GET /health HTTP/1.1\nOrigin: https://127.0.0.1:3000"), 200, rb'"status": "ok"'),
    "ok-chunked-outcome": (
        req(POST + "Transfer-Encoding: chunked", b"%x\r\n%s\r\n0\r\n\r\n" % (len(OUTCOME), OUTCOME)),
        200,
        rb'"total_harm"',
    ),
}


@pytest.mark.parametrize("raw, code, pattern", HTTP_ROWS.values(), ids=HTTP_ROWS.keys())
def test_bad_request_matrix(shared, raw, code, pattern):
    before = len(experiences(shared.db))
    answer = exchange(shared.port, raw)
    assert status(answer) == code, answer[:300]
    assert re.search(pattern, answer), answer[:300]
    if code >= 400:
        if code != 404:
            json.loads(body_of(answer))  # a JSON error, not http.server's HTML page
        if code != 500:  # the contract's 500s carry CORS headers, its 400s and 404s none
            assert b"Access-Control-Allow-Origin" not in answer
        assert len(experiences(shared.db)) == before
    assert health_ok(shared.port)
    assert "Traceback" not in shared.stderr()


def locked_db(tmp_path: Path) -> tuple[Path, dict, sqlite3.Connection]:
    """A SAIGE database another program holds an exclusive lock on (rollback journal, so readers wait too).
    Its snapshot is taken first: closing any descriptor of the file in this process would drop the lock."""
    db = tmp_path / "locked.db"
    saige_db.create(db).close()
    before = snapshot(db)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    return db, before, conn


def bank_with(tmp_path: Path, **change) -> Path:
    items = json.loads(BANK.read_text())
    items[3].update(change)
    path = tmp_path / "bank.json"
    path.write_text(json.dumps(items))
    return path


# id: (files made in tmp_path -> (args, env, files that must not change), exit code, stderr pattern)
CLI_ROWS = {
    "port-99999": (lambda t: (["--db", t / "w.db", "--init", "--port", "99999"], {}, []), 2, r"not a port number"),
    "port-negative": (lambda t: (["--db", t / "w.db", "--init", "--port", "-1"], {}, []), 2, r"not a port number"),
    "port-word": (lambda t: (["--db", t / "w.db", "--port", "http"], {}, []), 2, r"not a port number"),
    "host-unresolvable": (
        lambda t: (["--db", t / "w.db", "--init", "--host", "no-such-host.invalid", "--port", "0"], {}, []),
        1,
        r"^saige_worker\.py: error: cannot listen on no-such-host\.invalid",
    ),
    "client-timeout-zero": (lambda t: (["--client-timeout", "0"], {}, []), 2, r"--client-timeout.*between 0 and"),
    "client-timeout-nan": (lambda t: (["--client-timeout", "nan"], {}, []), 2, r"--client-timeout.*between 0 and"),
    "allow-origin-with-path": (
        lambda t: (["--allow-origin", "http://example.com/app"], {}, []),
        2,
        r"--allow-origin.*not an origin",
    ),
    "allow-origins-env-garbage": (lambda t: ([], {"SAIGE_ALLOW_ORIGINS": "ok.example"}, []), 2, r"SAIGE_ALLOW_ORIGINS"),
    "token-empty": (lambda t: (["--token", ""], {}, []), 2, r"--token must not be empty"),
    "db-empty": (lambda t: (["--db", ""], {}, []), 2, r"--db must not be empty"),
    "db-is-folder": (lambda t: (["--db", t, "--port", "0"], {}, []), 1, r"is a folder"),
    "db-is-folder-init": (lambda t: (["--db", t, "--init", "--port", "0"], {}, []), 1, r"is a folder"),
    "db-is-the-scenario-bank": (
        lambda t: (["--init", "--db", BANK, "--port", "0"], {}, [BANK]),
        1,
        r"not a SQLite database \(it looks like JSON\)",
    ),
    "db-is-bank-copy-both-flags": (
        lambda t: (
            ["--init", "--db", t / "b.json", "--bank", t / "b.json", "--port", "0"],
            {},
            [Path(t / "b.json").write_bytes(BANK.read_bytes()) and t / "b.json"],
        ),
        1,
        r"not a SQLite database",
    ),
    "db-is-text-init": (
        lambda t: (["--init", "--db", t / "notes.db", "--port", "0"], {}, [t / "notes.db"]),
        1,
        r"notes\.db is not a SQLite database",
    ),
    "db-folder-missing": (
        lambda t: (["--init", "--db", t / "nope" / "saige.db", "--port", "0"], {}, [t / "nope" / "saige.db"]),
        1,
        r"folder .*nope does not exist",
    ),
    "db-locked": ("locked", 1, r"is locked by another program"),
    "db-locked-init": ("locked-init", 1, r"is locked by another program"),
    "bank-is-folder": (lambda t: (["--init", "--db", t / "w.db", "--bank", t], {}, [t / "w.db"]), 1, r"is a folder"),
    "bank-bad-difficulty": (
        lambda t: (["--init", "--db", t / "w.db", "--bank", bank_with(t, difficulty_level="hard")], {}, [t / "w.db"]),
        1,
        r"item 3 has difficulty_level 'hard'",
    ),
    "bank-bad-split": (
        lambda t: (["--init", "--db", t / "w.db", "--bank", bank_with(t, split="test")], {}, [t / "w.db"]),
        1,
        r"item 3 has split 'test'",
    ),
    "bank-nan": (
        lambda t: (["--init", "--db", t / "w.db", "--bank", bank_with(t, difficulty_level=math.nan)], {}, [t / "w.db"]),
        1,
        r"not valid JSON: NaN",
    ),
    "bank-bad-into-foreign-sqlite": (
        lambda t: (["--init", "--db", t / "other.db", "--bank", bank_with(t, split="x")], {}, [t / "other.db"]),
        1,
        r"item 3 has split",
    ),
}


def cli_case(spec, tmp_path: Path) -> tuple[list, dict, dict, sqlite3.Connection | None]:
    """(args, environment, snapshot of the files that must not change, a connection holding a lock or None)."""
    (tmp_path / "notes.db").write_text("my notes, not a database\n" * 20)
    other = sqlite3.connect(tmp_path / "other.db")  # someone else's SQLite database, without SAIGE tables
    other.execute("CREATE TABLE notes (t TEXT)")
    other.commit()
    other.close()
    if callable(spec):
        args, env, files = spec(tmp_path)
        return args, env, snapshot(*files), None
    db, before, holder = locked_db(tmp_path)
    return ["--db", db, "--port", "0"] + (["--init"] if spec == "locked-init" else []), {}, before, holder


@pytest.mark.parametrize("spec, code, pattern", CLI_ROWS.values(), ids=CLI_ROWS.keys())
def test_bad_command_line_matrix(tmp_path, spec, code, pattern):
    args, env, before, holder = cli_case(spec, tmp_path)
    try:
        result = run(SCRIPT, *args, env=clean_env(**env), timeout=30)
    finally:
        if holder is not None:
            holder.close()
    assert_refused(result, code, pattern, unchanged=before)
    assert len(result.stderr.strip().splitlines()) == 1 or code == 2, result.stderr
    assert "listening" not in result.stdout


def test_bad_bank_leaves_no_new_database(tmp_path):
    db = tmp_path / "w.db"
    result = run(SCRIPT, "--init", "--db", db, "--bank", bank_with(tmp_path, split="x"), env=clean_env())
    assert_refused(result, 1, r"split")
    assert not db.exists()


def test_the_script_uploaded_alone_says_which_bank_file_it_needs(tmp_path):
    """Colab: the script uploaded without data/scenarios.json; --init names the file and --bank, creates nothing."""
    alone = tmp_path / "colab"
    alone.mkdir()
    (alone / SCRIPT).write_bytes((ROOT / SCRIPT).read_bytes())
    db = alone / "w.db"
    cmd = [sys.executable, str(alone / SCRIPT), "--init", "--db", str(db), "--port", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=60)
    assert_refused(result, 1, r"data/scenarios\.json .*copy that file to .*colab/data/scenarios\.json, or pass --bank")
    assert not db.exists() and sorted(p.name for p in alone.iterdir()) == [SCRIPT]


def test_port_in_use_leaves_no_new_database(tmp_path):
    db = tmp_path / "w.db"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        result = run(SCRIPT, "--init", "--db", db, "--port", sock.getsockname()[1], env=clean_env())
    assert_refused(result, 1, r"cannot listen on 127\.0\.0\.1:\d+")
    assert not db.exists()


def test_db_name_with_uri_characters_is_used_as_named(tmp_path):
    db = tmp_path / "my db?mode=rw#1%.db"
    with worker(db) as w:
        assert health_ok(w.port)
    assert db.is_file() and sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(db.name)) == []


# =========================================================================================================
# Who may call: origins, host names, tokens, bind address
# =========================================================================================================
def get(port: int, path: str = "/health", **headers: str) -> bytes:
    lines = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return exchange(port, f"GET {path} HTTP/1.1\r\n{lines}Connection: close\r\n\r\n".encode())


def test_allow_origin_flag_and_env_widen_the_origins(tmp_path):
    env = clean_env(SAIGE_ALLOW_ORIGINS="https://b.example, chrome-extension://*")
    with worker(tmp_path / "w.db", "--allow-origin", "https://a.example:8443/", env=env) as w:
        for allowed in ("https://a.example:8443", "https://b.example", "chrome-extension://abcdef"):
            answer = get(w.port, Host="127.0.0.1", Origin=allowed)
            assert status(answer) == 200 and b"Access-Control-Allow-Origin: *" in answer, allowed
        assert status(get(w.port, Host="127.0.0.1", Origin="https://c.example")) == 403
        assert status(get(w.port, Host="127.0.0.1", Origin="https://a.example:8444")) == 403


def test_allow_origin_star_allows_any_origin_but_not_a_foreign_host(tmp_path):
    with worker(tmp_path / "w.db", "--allow-origin", "*") as w:
        assert status(get(w.port, Host="127.0.0.1", Origin="https://evil.example")) == 200
        assert status(get(w.port, Host="127.0.0.1", Origin="null")) == 200
        assert status(get(w.port, Host="evil.example")) == 403


def test_token_allows_any_origin_and_host_but_still_needs_the_token(tmp_path):
    with worker(tmp_path / "w.db", "--token", "s3cret") as w:
        foreign = {"Host": "evil.example", "Origin": "https://evil.example"}
        assert status(get(w.port, "/api/stats", **foreign)) == 401
        assert status(get(w.port, "/api/stats", Authorization="Bearer s3cret", **foreign)) == 200


def test_non_loopback_bind_without_token_warns_and_skips_the_host_check(tmp_path):
    with worker(tmp_path / "w.db", host="0.0.0.0") as w:
        time.sleep(0.2)
        lines = [line for line in w.stderr().splitlines() if "warning" in line]
        assert len(lines) == 1 and "without a token" in lines[0] and "--token" in lines[0], w.stderr()
        assert status(get(w.port, Host="192.168.1.5:8787")) == 200  # a LAN name, as Ollama allows off loopback
        assert status(get(w.port, Host="127.0.0.1", Origin="https://evil.example")) == 403


def test_non_loopback_bind_with_token_does_not_warn(tmp_path):
    with worker(tmp_path / "w.db", "--token", "t", host="0.0.0.0") as w:
        assert status(get(w.port, Authorization="Bearer t")) == 200
    assert "warning" not in w.stderr()


def test_ipv6_loopback_bind(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with worker(tmp_path / "w.db", host="::1") as w:
        with socket.create_connection(("::1", w.port), timeout=READ_TIMEOUT_S) as sock:
            sock.sendall(f"GET /health HTTP/1.1\r\nHost: [::1]:{w.port}\r\nConnection: close\r\n\r\n".encode())
            assert status(read_all(sock)) == 200
    assert "warning" not in w.stderr()


# =========================================================================================================
# Body limit while reading, stalled clients
# =========================================================================================================
def test_chunked_body_is_refused_without_waiting_for_it(shared):
    """A 256 MB chunk announced: 413 at once, not after buffering it (the old reader called read(256 MB))."""
    with socket.create_connection(("127.0.0.1", shared.port), timeout=READ_TIMEOUT_S) as sock:
        sock.sendall(req(POST + "Transfer-Encoding: chunked", b"10000000\r\n" + b"x" * 4096))
        start = time.monotonic()
        answer = read_all(sock)  # no half-close: the server must answer while the client still "sends"
    assert status(answer) == 413, answer[:200]
    assert time.monotonic() - start < CLIENT_TIMEOUT_S, "it waited for the body instead of refusing it"


def test_many_small_chunks_stop_at_the_limit(shared):
    chunks = b"".join(b"%x\r\n%s\r\n" % (50_000, b"x" * 50_000) for _ in range(30))  # 1.5 MB in 30 chunks
    answer = exchange(shared.port, req(POST + "Transfer-Encoding: chunked", chunks + b"0\r\n\r\n"))
    assert status(answer) == 413, answer[:200]
    assert health_ok(shared.port)


@pytest.mark.parametrize(
    "partial",
    [b"", b"GET /hea", b"GET /health HTTP/1.1\r\nHost: 127.0", req(POST + "Content-Length: 200", b'{"scenario_id": 1')],
    ids=["silent", "half-request-line", "half-headers", "half-body"],
)
def test_stalled_client_is_dropped_and_blocks_no_one(shared, partial):
    before = len(experiences(shared.db))
    with socket.create_connection(("127.0.0.1", shared.port), timeout=READ_TIMEOUT_S) as sock:
        sock.sendall(partial)
        start = time.monotonic()
        assert health_ok(shared.port)  # served while the stalled client holds its connection
        answer = read_all(sock)  # returns when the worker drops the connection
        waited = time.monotonic() - start
    assert CLIENT_TIMEOUT_S * 0.5 <= waited < CLIENT_TIMEOUT_S + 3, waited
    assert status(answer) in (None, 400, 408), answer[:200]
    assert len(experiences(shared.db)) == before
    assert "Traceback" not in shared.stderr()


# =========================================================================================================
# Signals
# =========================================================================================================
def test_ctrl_c_exits_130_with_one_line(tmp_path):
    db = tmp_path / "w.db"
    cmd = [sys.executable, str(ROOT / SCRIPT), "--db", str(db), "--init", "--port", "0", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    assert "listening" in proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "saige_worker.py: stopped (Ctrl-C)", err


# =========================================================================================================
# Fuzzing: random raw requests always get an HTTP answer; the worker stays up, small and its data clean
# =========================================================================================================
FUZZ_PORT = 0  # the fuzz worker's port, set by the fixture (hypothesis strategies are built before it starts)
PATHS = ["/health", "/api/get-scenario", "/api/stats", "/api/simulate-outcome", "/api/score", "/api/scenarios", "/"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
outcome_bodies = (
    st.fixed_dictionaries({"scenario_id": st.integers(1, 100), "response": st.text(min_size=1, max_size=400)})
    | st.fixed_dictionaries(
        {
            "scenario_id": st.one_of(st.integers(-2, 120), st.text(max_size=5), json_values),
            "response": st.text(max_size=300) | json_values,
        }
    )
) | st.fixed_dictionaries(
    {
        "response": st.text(max_size=200),
        "scenario": st.fixed_dictionaries({"context": st.text(max_size=50)}, optional={"person_state": json_values}),
    }
)
bodies = st.one_of(
    outcome_bodies.map(lambda b: json.dumps(b).encode()),  # Python's json writes NaN/Infinity: the worker sees them
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
)
header_values = {
    "Host": st.sampled_from(["127.0.0.1", "localhost:8787", "[::1]", "evil.example", "", "a.localhost", "1.2.3.4"]),
    "Origin": st.sampled_from(["http://localhost:3000", "null", "https://evil.example", "file://", "http://[::1]"]),
    "Content-Length": st.sampled_from(["-1", "1e9", "abc", "99999999999999999999", "", "0", "5"])
    | st.integers(0, 400).map(str),
    "Transfer-Encoding": st.sampled_from(["chunked", "gzip", "chunked, gzip", "CHUNKED", "identity"]),
    "Expect": st.just("100-continue"),
    "Connection": st.sampled_from(["close", "keep-alive", "upgrade"]),
    "Content-Type": st.sampled_from(["application/json", "text/plain", "\xff"]),
}


@st.composite
def raw_requests(draw) -> tuple[bytes, bool]:
    """(request bytes, complete?) — a request line, headers and a body, each possibly malformed or cut short;
    one in three a well-framed POST of a random outcome body, so the scorer and the database write are fuzzed."""
    if draw(st.integers(0, 2)) == 0:
        path = draw(st.sampled_from(["/api/simulate-outcome", "/api/score"]))
        body = json.dumps(draw(outcome_bodies)).encode()
        return req(f"POST {path} HTTP/1.1\nContent-Length: {len(body)}\nConnection: close", body), True
    method = draw(st.sampled_from(["GET", "POST", "OPTIONS", "PUT", "DELETE", "HEAD", "PATCH", "BREW", "get", "P@ST"]))
    path = draw(st.sampled_from(PATHS)).encode() + draw(st.sampled_from([b"", b"?difficulty=", b"?split="]))
    path += draw(st.binary(max_size=12) | st.sampled_from([b"3", b"%zz", b"2.9", b"heldout", b"\xff\xfe"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.1", b"HTTP/2.0", b"HTTP/1.x", b""]))
    line = b" ".join(part for part in (method.encode(), path, version) if part)
    names = draw(st.lists(st.sampled_from(sorted(header_values)), max_size=5))
    headers = [(n.encode(), draw(header_values[n]).encode("latin-1")) for n in names]
    headers += draw(st.lists(st.tuples(st.binary(min_size=1, max_size=8), st.binary(max_size=20)), max_size=2))
    body = draw(bodies)
    names_lower = {n.lower() for n, _ in headers}
    if b"content-length" not in names_lower and draw(st.booleans()):
        headers.append((b"Content-Length", str(len(body)).encode()))
    if b"transfer-encoding" in names_lower and draw(st.booleans()):
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    data = line + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n" + body
    cut = draw(st.none() | st.integers(0, len(data) - 1))
    return (data, True) if cut is None else (data[:cut], False)


@pytest.fixture(scope="module")
def fuzz_worker(tmp_path_factory) -> Worker:
    global FUZZ_PORT
    with worker(tmp_path_factory.mktemp("fuzz") / "saige.db", "--quiet") as w:
        FUZZ_PORT = w.port
        for _ in range(20):  # warm up: threads, the SQLite connection and the scorer's regexes are allocated
            assert health_ok(w.port)
            exchange(w.port, req(POST + f"Content-Length: {len(OUTCOME)}", OUTCOME))
        w.rss_start = rss_kb(w.proc.pid)
        yield w


def test_fuzz_raw_http_requests_always_get_an_http_answer(fuzz_worker):
    """Complete requests get a status line (a request line with no words, e.g. only spaces, is closed without
    an answer: there is nothing to answer). Cut-short requests get a status line or a clean close."""

    @settings(
        max_examples=FUZZ_EXAMPLES,
        derandomize=True,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(raw_requests())
    def check(case):
        data, complete = case
        answer = exchange(FUZZ_PORT, data)
        first_line = data.split(b"\n", 1)[0]
        if complete and first_line.split():
            assert status(answer) is not None, (data[:200], answer[:200])
        else:
            assert answer == b"" or status(answer) is not None, (data[:200], answer[:200])
        if status(answer) and status(answer) >= 400 and status(answer) not in (404, 405):
            assert b"Traceback" not in answer
        assert fuzz_worker.proc.poll() is None, "the worker died"
        assert health_ok(FUZZ_PORT)

    check()
    growth = rss_kb(fuzz_worker.proc.pid) - fuzz_worker.rss_start
    assert growth < MAX_RSS_GROWTH_KB, f"RSS grew by {growth} kB"
    for harm, breakdown, scores in experiences(fuzz_worker.db):
        assert isinstance(harm, float) and math.isfinite(harm)
        for text in (breakdown, scores):
            assert not re.search(r"NaN|Infinity", text), text
            assert all(math.isfinite(v) for v in json.loads(text).values())
    assert "Traceback" not in fuzz_worker.stderr()
