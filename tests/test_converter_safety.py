"""saige_to_sft.py's safety promises: no output ever replaces an input, a failed run changes no file, messy rows are
skipped and counted, Ctrl-C exits 130. Run as a user runs it, plus an in-process fuzz over random messy databases."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import saige_db
from conftest import FUZZ_EXAMPLES, ROOT, assert_refused, run, snapshot
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(ROOT))
import saige_to_sft  # noqa: E402 - in-process for the fuzz test only; every other test runs the script

SCRIPT = "saige_to_sft.py"
OLD_OUTPUT = b"text,harm_score\r\nthe user's earlier training data,0.1\r\n"
OLD_PAIRS = b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n'
OLD_META = b'{"format": "mistral"}\n'


def scores(x: float) -> dict:
    return dict.fromkeys(saige_db.WEIGHTS, x)


def folder_state(folder: Path) -> dict:
    """Every file under `folder` (names and bytes), to prove a refused run created, changed and removed nothing."""
    return {p.relative_to(folder): (p.read_bytes() if p.is_file() else "dir") for p in sorted(folder.rglob("*"))}


# --- the bad-input matrix ------------------------------------------------------------------------------------
# Each row: what to prepare in the folder x/, the arguments ({x} is the folder), the exit code, a pattern of the
# error line. Every row also proves that no file in x/ was created, changed or removed (the database, a
# pre-existing output, its sidecar and a pre-existing pairs file included).
MATRIX = [
    # 1. no output ever replaces an input (usage errors, exit 2)
    ("", ["--db", "{x}/saige.db", "-o", "{x}/saige.db"], 2, r"--output .*saige\.db is the same file as --db"),
    ("hardlink", ["-o", "{x}/hard.db"], 2, r"--output .*hard\.db is the same file as --db"),
    ("symlink", ["-o", "{x}/link.csv"], 2, r"--output .*link\.csv is the same file as --db"),
    ("", ["-o", "{x}/sub/../saige.db"], 2, r"is the same file as --db"),
    ("", ["-o", "{x}/saige.db-wal"], 2, r"--output .*saige\.db-wal is the same file as --db \(wal\)"),
    ("", ["-o", "{x}/saige.db-journal"], 2, r"same file as --db \(journal\)"),
    ("sidecar-db", ["--db", "{x}/train.csv.meta.json", "-o", "{x}/train.csv"], 2, r"--output \(sidecar\) .*same file"),
    ("", ["--dpo-output", "{x}/saige.db"], 2, r"--dpo-output .*saige\.db is the same file as --db"),
    ("", ["--dpo-output", "{x}/./out.csv"], 2, r"--dpo-output .*out\.csv and --output .*are the same file"),
    ("", ["--dpo-output", "{x}/out.csv.meta.json"], 2, r"--dpo-output .* and --output \(sidecar\) .*same file"),
    ("", ["--dpo-output", "-"], 2, r"--dpo-output must be a file other than --output"),
    ("tokenizer", ["--format", "auto", "--tokenizer", "{x}/tok.gguf", "-o", "{x}/tok.gguf"], 2, r"same file as --tok"),
    # 2. validation before work: absurd numbers are usage errors, unwritable outputs exit 1 before the db is read
    ("", ["--limit", str(10**30)], 2, r"--limit: must be a positive integer up to 9223372036854775807"),
    ("", ["--limit", "-5"], 2, r"--limit: must be a positive integer"),
    ("", ["--best-per-scenario", str(10**20)], 2, r"--best-per-scenario: must be a positive integer up to"),
    ("", ["--model-version", "99999999999999999999"], 2, r"--model-version: must be an integer between"),
    ("", ["--model-version", "-99999999999999999999"], 2, r"--model-version: must be an integer between"),
    ("", ["--dpo-margin", "nan"], 2, r"--dpo-margin: must be between 0 and 10"),
    ("", ["--max-harm", "inf"], 2, r"--max-harm: must be between 0 and 1"),
    ("", ["--system-prompt", os.fsdecode(b"caf\xe9")], 2, r"--system-prompt is not valid UTF-8"),
    ("", ["-o", "{x}/missing/out.csv"], 1, r"output directory does not exist: .*missing"),
    ("", ["-o", "{x}"], 1, r"cannot write --output .*: .* is a folder, not a file"),
    ("", ["-o", "{x}/saige.db/out.csv"], 1, r"cannot write --output .*saige\.db is a file, not a folder"),
    ("", ["-o", "/proc/self/out.csv"], 1, r"cannot write --output /proc/self/out\.csv: cannot write in folder"),
    ("fifo", ["-o", "{x}/fifo"], 1, r"cannot write --output .*fifo: not a regular file"),
    ("sidecar-dir", ["-o", "{x}/new.csv"], 1, r"cannot write --output \(sidecar\) .*new\.csv\.meta\.json: .*folder"),
    ("pairs-sidecar-dir", ["--dpo-output", "{x}/pairs.jsonl"], 1, r"--dpo-output \(sidecar\) .*is a folder"),
    ("", ["--dpo-output", "{x}/missing/pairs.jsonl"], 1, r"output directory does not exist: .*missing"),
    # 6. messages that say what is wrong with the database
    ("", ["--db", "{x}/nope.db"], 1, r"database not found: .*nope\.db"),
    ("text-db", ["--db", "{x}/notes.db"], 1, r"notes\.db is not a SQLite database"),
    ("empty-db", ["--db", "{x}/empty.db"], 1, r"empty\.db is an empty file, not a SQLite database"),
    ("", ["--db", "{x}"], 1, r"--db .* is a folder; pass the database file"),
    ("locked", [], 1, r"database .*saige\.db is locked by another program"),
    # 3. a run that fails after the database is read leaves every earlier output as it was
    ("", ["--min-buddhist", "10"], 6, r"No experiences found matching criteria"),
    ("all-empty", [], 6, r"every selected answer was empty after cleanup"),
]


def prepare(kind: str, x: Path) -> None:
    """Set up the folder for one matrix row."""
    saige_db.build_demo(x / "saige.db", n_experiences=40)
    (x / "out.csv").write_bytes(OLD_OUTPUT)
    (x / "out.csv.meta.json").write_bytes(OLD_META)
    (x / "pairs.jsonl").write_bytes(OLD_PAIRS)
    (x / "pairs.jsonl.meta.json").write_bytes(OLD_META)
    if kind == "hardlink":
        os.link(x / "saige.db", x / "hard.db")
    elif kind == "symlink":
        (x / "link.csv").symlink_to(x / "saige.db")
    elif kind == "sidecar-db":
        saige_db.build_demo(x / "train.csv.meta.json", n_experiences=10)
    elif kind == "tokenizer":
        (x / "tok.gguf").write_bytes(b"GGUF a tokenizer the user downloaded")
    elif kind == "fifo":
        os.mkfifo(x / "fifo")
    elif kind == "sidecar-dir":
        (x / "new.csv.meta.json").mkdir()
    elif kind == "pairs-sidecar-dir":
        (x / "pairs.jsonl.meta.json").unlink()
        (x / "pairs.jsonl.meta.json").mkdir()
    elif kind == "text-db":
        (x / "notes.db").write_text("these are my notes, not a database\n" * 50)
    elif kind == "empty-db":
        (x / "empty.db").touch()
    elif kind == "all-empty":  # every selected answer is only a role prefix, so cleanup leaves nothing
        (x / "saige.db").unlink()
        conn = saige_db.create(x / "saige.db")
        with conn:
            sid = saige_db.add_scenario(conn, "Hello!")
            saige_db.add_experience(conn, sid, "Assistant:", 0.0, scores(9))
            saige_db.add_experience(conn, sid, "A poor answer.", 0.9, scores(2))
        conn.close()


@contextlib.contextmanager
def locked(db: Path):
    """A writer in the middle of a transaction (rollback journal: readers must wait). Taken after the folder's
    snapshot: reading the file in this process would drop the lock (POSIX locks belong to the process)."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


@pytest.mark.parametrize(
    "kind, args, code, pattern", MATRIX, ids=[f"{i:02d}-{row[0] or row[1][-1][-24:]}" for i, row in enumerate(MATRIX)]
)
def test_bad_input_matrix(tmp_path, kind, args, code, pattern):
    x = tmp_path / "x"
    x.mkdir()
    prepare(kind, x)
    before = folder_state(x)
    args = [a.replace("{x}", str(x)) for a in args]
    defaults = ["--db", str(x / "saige.db"), "-o", str(x / "out.csv"), "--dpo-output", str(x / "pairs.jsonl")]
    with locked(x / "saige.db") if kind == "locked" else contextlib.nullcontext():
        result = run(SCRIPT, *defaults, *args, timeout=60)
    assert_refused(result, code, rf"^saige_to_sft\.py: error: .*{pattern}|^{pattern}")
    assert folder_state(x) == before, "a refused run created, changed or removed a file"


# --- all-or-nothing outputs ------------------------------------------------------------------------------
def test_a_failed_rename_restores_every_output(tmp_path, monkeypatch):
    """If one of the final renames fails, the files already replaced get their old bytes back."""
    db = tmp_path / "saige.db"
    saige_db.build_demo(db, n_experiences=40)
    for name, data in [("out.csv", OLD_OUTPUT), ("pairs.jsonl", OLD_PAIRS), ("out.csv.meta.json", OLD_META)]:
        (tmp_path / name).write_bytes(data)
    before = folder_state(tmp_path)
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # output and pairs are in place, then the first sidecar fails
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(saige_to_sft.os, "replace", failing_replace)
    args = ["--db", str(db), "-o", str(tmp_path / "out.csv"), "--dpo-output", str(tmp_path / "pairs.jsonl"), "-q"]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert saige_to_sft.main(args) == 1
    assert "No space left on device" in stderr.getvalue()
    assert len(calls) >= 3
    assert folder_state(tmp_path) == before


def test_a_successful_run_replaces_every_output_together(tmp_path):
    db = tmp_path / "saige.db"
    saige_db.build_demo(db, n_experiences=40)
    (tmp_path / "out.csv").write_bytes(OLD_OUTPUT)
    (tmp_path / "pairs.jsonl").write_bytes(OLD_PAIRS)
    result = run(SCRIPT, "--db", db, "-o", tmp_path / "out.csv", "--dpo-output", tmp_path / "pairs.jsonl")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.csv").read_bytes() != OLD_OUTPUT
    assert (tmp_path / "pairs.jsonl").read_bytes() != OLD_PAIRS
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["out.csv", "out.csv.meta.json", "pairs.jsonl", "pairs.jsonl.meta.json", "saige.db"]


# --- messy rows ------------------------------------------------------------------------------------------
MESSY_UPDATES = {  # (what is wrong, SQL that breaks one good row, the stage it must be counted under)
    "BLOB answer": ("UPDATE experiences SET ai_response = x'48656c6c6f'", "encoding"),
    "invalid UTF-8 answer": ("UPDATE experiences SET ai_response = CAST(x'48ff6c6f' AS TEXT)", "encoding"),
    "BLOB alignment": ("UPDATE experiences SET buddhist_alignment = x'676f6f64'", "encoding"),
    "+Infinity harm": ("UPDATE experiences SET actual_harm = 9e999", "number"),
    "-Infinity harm": ("UPDATE experiences SET actual_harm = -9e999", "number"),
    "text harm": ("UPDATE experiences SET actual_harm = 'low'", "number"),
    "BLOB harm": ("UPDATE experiences SET actual_harm = x'00'", "number"),
    "1e999 score": ("UPDATE experiences SET buddhist_scores = replace(buddhist_scores, ': 7,', ': 1e999,')", "number"),
    "1e999 and -1e999 scores (NaN)": (
        """UPDATE experiences SET buddhist_scores =
           '{"ahimsa": 1e999, "sacca": -1e999, "karuna": 7, "panna": 7, "upekkha": 7}'""",
        "number",
    ),
    "text score": ("UPDATE experiences SET buddhist_scores = json_set(buddhist_scores, '$.sacca', '9')", "number"),
    "BLOB scores": ("UPDATE experiences SET buddhist_scores = CAST(buddhist_scores AS BLOB)", "malformed"),
    "array scores": ("UPDATE experiences SET buddhist_scores = '[7, 7, 7, 7, 7]'", "malformed"),
    "BLOB breakdown": ("UPDATE experiences SET harm_breakdown = x'7b7d'", "malformed"),
    "BLOB timestamp (still usable)": ("UPDATE experiences SET timestamp = x'00ff'", "selected"),
}


def build_messy(path: Path) -> dict:
    """A database with one broken row per kind of mess, and the counts the converter must report."""
    conn = saige_db.create(path)
    expected = {"selected": 1, "encoding": 0, "number": 0, "malformed": 0, "harm": 0}
    with conn:
        sid = saige_db.add_scenario(conn, "Hello!")
        saige_db.add_experience(conn, sid, "A kind, fine answer.", 0.1, scores(7))
        for what, (sql, stage) in MESSY_UPDATES.items():
            row = saige_db.add_experience(conn, sid, f"The row with {what}.", 0.1, scores(7))
            conn.execute(sql + " WHERE id = ?", (row,))
            expected[stage] += 1
        for answer, fix in [  # high-harm rows that would be DPO's rejected answers, were they usable
            ("bad", "UPDATE experiences SET ai_response = CAST(x'62ff' AS TEXT)"),
            ("worse", "UPDATE experiences SET buddhist_scores = replace(buddhist_scores, ': 1,', ': -1e999,')"),
        ]:
            row = saige_db.add_experience(conn, sid, answer, 0.9, scores(1))
            conn.execute(fix + " WHERE id = ?", (row,))
            expected["harm"] += 1
        for context, state, stage in [  # scenarios whose text the converter could not write
            ("CAST(x'ff' AS TEXT)", "'{}'", "encoding"),
            ("x'4869'", "'{}'", "encoding"),
            ("'Hi'", 'CAST(\'{"mood": "sad"}\' AS BLOB)', "malformed"),
            ("'Hi'", "'{\"mood\": \"' || CAST(x'ff' AS TEXT) || '\"}'", "encoding"),
        ]:
            bad = conn.execute(
                f"INSERT INTO scenarios (context, person_state, difficulty_level) VALUES ({context}, {state}, 1)"
            ).lastrowid
            saige_db.add_experience(conn, bad, "An answer to a broken scenario.", 0.1, scores(7))
            expected[stage] += 1
        odd = saige_db.add_scenario(conn, "Odd difficulty")
        conn.execute("UPDATE scenarios SET difficulty_level = x'01' WHERE id = ?", (odd,))
        saige_db.add_experience(conn, odd, "An answer.", 0.1, scores(7))
        expected["number"] += 1
    conn.close()
    return expected


def no_infinity(token: str):
    raise AssertionError(f"JSON output contains {token}")


def test_messy_rows_are_skipped_and_counted(tmp_path):
    db = tmp_path / "messy.db"
    expected = build_messy(db)
    before = snapshot(db)
    out, pairs = tmp_path / "out.jsonl", tmp_path / "pairs.jsonl"
    result = run(SCRIPT, "--db", db, "-o", out, "--output-format", "jsonl", "--dpo-output", pairs)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert snapshot(db) == before
    rows = [json.loads(line, parse_constant=no_infinity) for line in out.read_text().splitlines()]
    assert len(rows) == expected["selected"] == 2  # the fine answer and the one with a BLOB timestamp
    assert all(r["harm_score"] == 0.1 and r["weighted_score"] == 7.0 for r in rows)
    assert pairs.read_text() == ""  # the only answers a margin below lie in unusable rows
    counts = json.loads(out.with_name("out.jsonl.meta.json").read_text())["counts"]
    for stage in ("encoding", "number", "malformed", "harm"):
        assert counts[f"removed_{stage}"] == expected[stage], stage
    total = sqlite3.connect(db).execute("SELECT COUNT(*) FROM experiences").fetchone()[0]
    assert counts["selected"] + sum(v for k, v in counts.items() if k.startswith("removed_")) == total
    assert (
        f"Skipped rows: {expected['malformed']} NULL or malformed JSON, {expected['number']} non-numeric or "
        f"non-finite harm, score or difficulty, {expected['encoding']} binary or invalid UTF-8 text" in result.stderr
    )


def test_messy_rows_never_match_explains_with_named_reasons(tmp_path):
    db = tmp_path / "messy.db"
    expected = build_messy(db)
    out = tmp_path / "out.csv"
    out.write_bytes(OLD_OUTPUT)
    result = run(SCRIPT, "--db", db, "-o", out, "--min-buddhist", "9")
    assert_refused(result, 6, r"^No experiences found matching criteria", unchanged={out: OLD_OUTPUT})
    assert f"{expected['encoding']} removed: binary or invalid UTF-8 text" in result.stderr
    assert f"{expected['number']} removed: non-numeric or non-finite harm, score or difficulty" in result.stderr


# --- Ctrl-C and closed pipes -----------------------------------------------------------------------------
def big_database(path: Path, rows: int) -> None:
    conn = saige_db.create(path)
    with conn:
        sid = saige_db.add_scenario(conn, "Tell me something.")
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
            " INSERT INTO experiences (scenario_id, ai_response, actual_harm, harm_breakdown, buddhist_scores,"
            " buddhist_alignment, timestamp)"
            " SELECT ?, 'answer number ' || i, (i % 100) / 100.0, '{}', ?, 'good', '2026-01-01T00:00:00Z' FROM n",
            (rows, sid, json.dumps(scores(7))),
        )
    conn.close()


def test_ctrl_c_during_the_sql_phase_exits_130_and_changes_nothing(tmp_path):
    db = tmp_path / "big.db"
    big_database(db, 300_000)
    out = tmp_path / "out.csv"
    out.write_bytes(OLD_OUTPUT)
    before = folder_state(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / SCRIPT), "--db", db, "-o", out, "--dedup"], stderr=subprocess.PIPE, text=True
    )
    time.sleep(0.5)  # the SQL scan of 300k rows (and a Python function per row for --dedup) takes seconds
    assert proc.poll() is None, "the conversion finished before the interrupt"
    assert not any(p.name.startswith(".out.csv.") for p in tmp_path.iterdir()), "still in the SQL phase"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert_refused(subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr), 130, r"interrupted")
    assert stderr.strip().count("\n") == 0, stderr
    assert folder_state(tmp_path) == before


def test_closed_stdout_is_quiet_exit_0(tmp_path):
    db = tmp_path / "big.db"
    big_database(db, 20_000)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / SCRIPT), "--db", db, "-o", "-", "--output-format", "jsonl", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    json.loads(proc.stdout.readline())
    proc.stdout.close()  # like `| head -1`
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and stderr == "", stderr


# --- fuzz: random messy databases, in process ------------------------------------------------------------
class Blob(bytes):
    """Stored as a BLOB."""


class BadText(bytes):
    """Stored as TEXT whose bytes need not be UTF-8 (sqlite3 cannot fetch them as str)."""


WEIRD_JSON = [
    "{",
    "[7, 7]",
    '"text"',
    "null",
    "{}",
    '{"ahimsa": Infinity, "sacca": 7, "karuna": 7, "panna": 7, "upekkha": 7}',
    '{"ahimsa": 1e999, "sacca": 7, "karuna": 7, "panna": 7, "upekkha": 7}',
    '{"ahimsa": -1e999, "sacca": 1e999, "karuna": 7, "panna": 7, "upekkha": 7}',
    '{"ahimsa": "9", "sacca": 7, "karuna": 7, "panna": 7, "upekkha": 7}',
    '{"ahimsa": [9], "sacca": true, "karuna": null, "panna": 7, "upekkha": 7}',
    '{"mood": "\\ud800", "vulnerability": {"deep": [1, 2]}}',
    '{"mood": ' * 1200 + "1" + "}" * 1200,  # deeper than Python's json module can parse
]
finite = st.floats(allow_nan=False, allow_infinity=False)
messy_value = st.one_of(
    st.binary(min_size=1, max_size=6).map(BadText),
    st.binary(max_size=6).map(Blob),
    st.sampled_from([-math.inf, math.inf, math.nan, 1e308, -0.0, 0.5]),
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.text(max_size=12),
    st.sampled_from(WEIRD_JSON),
    st.dictionaries(
        st.sampled_from([*saige_db.WEIGHTS, "mood"]), st.one_of(finite, st.text(max_size=3), st.none()), max_size=6
    ).map(json.dumps),
)


def column(good) -> st.SearchStrategy:
    return st.one_of(good, messy_value)


GOOD = json.dumps(dict.fromkeys(saige_db.WEIGHTS, 7.0))
good_scores = st.fixed_dictionaries({k: st.floats(0, 10) for k in saige_db.WEIGHTS}).map(json.dumps)


def rows(*goods) -> st.SearchStrategy:
    """Clean rows (so that data gets through), rows with one messy column (so that it reaches the output if not
    caught), rows with any column messy."""
    clean = st.tuples(*goods)
    one_messy = st.tuples(clean, st.integers(0, len(goods) - 1), messy_value).map(
        lambda t: (*t[0][: t[1]], t[2], *t[0][t[1] + 1 :])
    )
    return st.one_of(clean, one_messy, st.tuples(*map(column, goods)))


GOOD = json.dumps(dict.fromkeys(saige_db.WEIGHTS, 7.0))
good_scores = st.fixed_dictionaries({k: st.floats(0, 10) for k in saige_db.WEIGHTS}).map(json.dumps)
scenario_rows = rows(
    st.sampled_from(["Hello!", "I took my pill twice.", "  "]),
    st.sampled_from(['{"mood": "neutral", "vulnerability": "low"}', '{"mood": "sad"}']),
    st.integers(1, 5),
    st.sampled_from([None, "The reference answer."]),
)
experience_rows = rows(
    st.sampled_from([1, 2, 3, 9]),  # scenario 1 is clean; 9 is an orphan
    st.sampled_from(["A kind answer.", "Assistant: Hello.\nUser: thanks", "", "Hi. And then"]),
    st.floats(0, 1),
    st.just('{"deception": 0.1}'),
    good_scores,
    st.sampled_from(["good", "excellent", " Good ", "moderate", "low", None]),
    st.integers(1, 3),
    st.sampled_from(["2026-01-31T10:54:57.175Z", "2025-12-01 09:00:00", "yesterday"]),
)
run_args = st.fixed_dictionaries(
    {
        "jsonl": st.booleans(),
        "layout": st.sampled_from(["text", "messages", "prompt-completion"]),
        "permissive": st.sampled_from([True, False]),  # thresholds that let most clean rows through
        "dpo": st.booleans(),
        "extra": st.lists(
            st.sampled_from(
                [["--dedup"], ["--best-per-scenario", "1"], ["--include-gold"], ["--trim-unfinished"], ["--no-clean"]]
            ),
            max_size=3,
        ),
    }
)


def insert(conn: sqlite3.Connection, table: str, columns: list[str], values: tuple) -> None:
    marks = ["CAST(? AS TEXT)" if isinstance(v, BadText) else "?" for v in values]
    params = [bytes(v) if isinstance(v, bytes) else v for v in values]
    with contextlib.suppress(sqlite3.IntegrityError):  # NULL (or NaN, stored as NULL) in a NOT NULL column
        conn.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(marks)})", params)


def fuzz_database(path: Path, scenarios: list, experiences: list) -> int:
    conn = saige_db.create(path)
    conn.execute("PRAGMA synchronous = OFF")
    with conn:
        saige_db.add_scenario(conn, "Hello!", expected_response="Hello to you.")
        for row in scenarios:
            insert(conn, "scenarios", ["context", "person_state", "difficulty_level", "expected_response"], row)
        for row in experiences:
            cols = ["scenario_id", "ai_response", "actual_harm", "harm_breakdown", "buddhist_scores"]
            insert(conn, "experiences", [*cols, "buddhist_alignment", "model_version", "timestamp"], row)
    total = conn.execute("SELECT COUNT(*) FROM experiences").fetchone()[0]
    conn.close()
    return total


def check_output(path: Path, jsonl: bool) -> int:
    """The file loads completely (every JSONL line parses without Infinity/NaN; CSV as CSV); its row count."""
    text = path.read_text(encoding="utf-8")
    if jsonl:
        return len([json.loads(line, parse_constant=no_infinity) for line in text.splitlines()])
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert rows[0][:2] == ["text", "harm_score"] and all(len(r) == len(rows[0]) for r in rows)
    assert not any(v.lower() in ("inf", "-inf", "nan") for r in rows for v in r[1:4])
    return len(rows) - 1


@settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@example(  # the classes of mess the issue names, always tried whatever the budget
    scenarios=[(BadText(b"Hi\xff"), "{}", 1, None), ("Hi", "{}", Blob(b"\x01"), None)],
    experiences=[
        (1, BadText(b"ok\xff"), 0.1, "{}", GOOD, "good", 1, "2026-01-01"),
        (1, Blob(b"ok"), 0.1, "{}", GOOD, "good", 1, "2026-01-01"),
        (1, "Fine.", -math.inf, "{}", GOOD, "good", 1, "2026-01-01"),
        (1, "Fine.", 0.1, "{}", GOOD.replace("7.0", "1e999", 1), "good", 1, Blob(b"\x00")),
        (2, "Fine.", 0.1, "{}", GOOD, "good", 1, "2026-01-01"),
        (3, "Fine.", 0.1, "{}", GOOD, "good", 1, "2026-01-01"),
        (1, "A kind answer.", 0.0, "{}", GOOD, Blob(b"good"), 1, "2026-01-01"),
        (1, "A kind answer.", 0.0, "{}", GOOD, "good", 1, "2026-01-01"),
    ],
    options={"jsonl": True, "layout": "text", "permissive": True, "dpo": True, "extra": [["--include-gold"]]},
)
@given(
    scenarios=st.lists(scenario_rows, max_size=3),
    experiences=st.lists(experience_rows, min_size=1, max_size=16),
    options=run_args,
)
def test_fuzz_messy_databases_never_crash_the_converter(scenarios, experiences, options):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        db = folder / "saige.db"
        total = fuzz_database(db, scenarios, experiences)
        before = snapshot(db)
        out = folder / ("out.jsonl" if options["jsonl"] else "out.csv")
        args = ["--db", str(db), "-o", str(out), "--format", "chatml"]
        if options["jsonl"]:
            args += ["--output-format", "jsonl", "--layout", options["layout"]]
        if options["permissive"]:
            args += ["--max-harm", "1", "--min-buddhist", "0", "--min-alignment", "low"]
        if options["dpo"]:
            args += ["--dpo-output", str(folder / "pairs.jsonl"), "--dpo-margin", "0"]
        args += [a for extra in options["extra"] for a in extra]
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                code = saige_to_sft.main(args)
            except SystemExit as e:  # a usage error would be a bug in the test's arguments
                code = e.code
        message = stderr.getvalue()
        event(f"exit {code}")  # --hypothesis-show-statistics: how many examples wrote data
        assert snapshot(db) == before, "the database changed"
        assert "Traceback" not in message and "unexpected" not in message, message
        if code == 6:
            assert re.search(r"No experiences found|every selected answer was empty", message), message
            assert sorted(p.name for p in folder.iterdir()) == ["saige.db"]
            return
        assert code == 0, message
        written = check_output(out, options["jsonl"])
        meta = json.loads(Path(f"{out}.meta.json").read_text(), parse_constant=no_infinity)
        counts = meta["counts"]
        assert written == counts["written"] + counts.get("gold", 0)
        assert counts["selected"] + sum(v for k, v in counts.items() if k.startswith("removed_")) == total
        if options["dpo"]:
            pairs = check_output(folder / "pairs.jsonl", jsonl=True)
            assert pairs == counts.get("dpo_pairs", 0)
