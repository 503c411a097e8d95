"""A `wrangler d1 export` SQL file as --db: loaded into a temporary database and converted exactly as the database
file would be; anything but SAIGE's tables and rows is refused with one line."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
import saige_db
from conftest import ROOT, run

LOOSE = ("--max-harm", "1", "--min-buddhist", "0", "--min-alignment", "low", "--include-gold", "--dedup")


def convert(db: Path, out: Path, tmp: Path, *args) -> object:
    return run("saige_to_sft.py", "--db", db, "-o", out, "-q", *LOOSE, *args, env={**os.environ, "TMPDIR": str(tmp)})


@pytest.fixture
def exported(demo_db, tmp_path) -> Path:
    target = tmp_path / "saige-export.sql"
    saige_db.wrangler_export(demo_db, target)
    return target


@pytest.mark.parametrize("style", ["wrangler", "sqlite3 .dump"])
def test_an_export_converts_exactly_as_the_database(demo_db, exported, tmp_path, style):
    if style != "wrangler":
        exported.write_text("\n".join(sqlite3.connect(demo_db).iterdump()) + "\n")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    want, got = tmp_path / "want.csv", tmp_path / "got.csv"
    assert convert(demo_db, want, scratch).returncode == 0
    result = convert(exported, got, scratch, "--dpo-output", tmp_path / "pairs.jsonl")
    assert result.returncode == 0, result.stderr
    assert got.read_bytes() == want.read_bytes()
    meta = json.loads(Path(f"{got}.meta.json").read_text())
    assert meta["source_db"] == str(exported.resolve()) and meta["source_rows"]["experiences"] > 100
    assert not list(scratch.iterdir())  # the temporary database is gone


@pytest.mark.parametrize(
    ("tail", "message", "shown"),
    [
        ("DROP TABLE scenarios;\n", "not a SAIGE table, index or row: ", "DROP TABLE"),
        ("CREATE TABLE users (id);\n", "not a SAIGE table, index or row: ", "CREATE TABLE users"),
        ("ATTACH DATABASE '/tmp/x.db' AS x;\n", "not a SAIGE table, index or row: ", "ATTACH"),
        ("INSERT INTO users VALUES(1);\n", "not a SAIGE table, index or row: ", "INSERT INTO users"),
        ('INSERT INTO "scenarios" VALUES(1, \'cut off', "the file ends inside a statement", "truncated"),
    ],
)
def test_anything_but_saige_rows_is_refused_with_one_line(exported, tmp_path, tail, message, shown):
    exported.write_text(exported.read_text() + tail)
    out = tmp_path / "out.csv"
    result = convert(exported, out, tmp_path)
    assert result.returncode == 1 and message in result.stderr and result.stderr.count("\n") == 1
    assert shown in result.stderr
    assert "line " in result.stderr and not out.exists()
    assert not list(tmp_path.glob("saige-d1-*"))


def test_a_binary_or_empty_export_is_refused(tmp_path):
    bad = tmp_path / "bad.sql"
    bad.write_bytes(b"INSERT INTO scenarios VALUES('\xff\xfe');\n")
    result = convert(bad, tmp_path / "out.csv", tmp_path)
    assert result.returncode == 1 and "not UTF-8 text" in result.stderr
    empty = tmp_path / "empty.sql"
    empty.write_text("PRAGMA defer_foreign_keys=TRUE;\n")
    result = convert(empty, tmp_path / "out.csv", tmp_path)
    assert (
        result.returncode == 1
        and "has no 'experiences' table" in result.stderr.replace("'scenarios'", "'experiences'")
        and "empty.sql" in result.stderr
    )


def test_the_pipeline_reads_an_export_but_never_collects_into_it(tmp_path, exported):
    env = {**os.environ, "DB_PATH": str(exported), "OUTPUT_DIR": str(tmp_path / "out")}
    result = subprocess.run(["bash", str(ROOT / "train_pipeline.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "is a SQL export (wrangler d1 export)" in result.stderr
    assert "SKIP_COLLECT=1" in result.stderr and not (tmp_path / "out" / "iter-1").exists()
