"""One set of conventions across the scripts: the same flag means the same thing, and the exit codes a script
(the pipeline, a user's cron job) branches on are the documented ones. Each run as a user runs it."""

from __future__ import annotations

import json

from conftest import run

ECHO = ("--backend", "echo", "--episodes", "2", "--concurrency", "1", "--retries", "2", "--timeout", "1")


def test_collector_json_alone_prints_the_summary_and_json_file_writes_it(worker_url, tmp_path):
    printed = run("collect_experiences.py", "--worker-url", worker_url, *ECHO, "--json", "-q")
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout)["scored"] == 2

    out = tmp_path / "summary.json"
    written = run("collect_experiences.py", "--worker-url", worker_url, *ECHO, "--json", str(out), "-q")
    assert written.returncode == 0, written.stderr
    assert written.stdout == ""
    assert json.loads(out.read_text())["scored"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left beside it


def test_evaluator_json_alone_prints_only_json_on_stdout(tiny_model, worker_url):
    result = run(
        "test_model.py", "--model", str(tiny_model), "--worker-url", worker_url, "--limit", "2",
        "--max-new-tokens", "4", "-q", "--json", timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # the whole of stdout is one JSON document
    assert len(data["results"][str(tiny_model)]) == 2
    assert "weighted score (0-10)" in result.stderr  # the tables moved to stderr


def test_json_file_that_is_an_input_is_refused_in_both_scripts(tiny_model, worker_url, tmp_path):
    db = tmp_path / "saige.db"
    collector = run("collect_experiences.py", "--worker-url", worker_url, *ECHO, "--db", str(db), "--json", str(db))
    assert collector.returncode == 2 and "--json" in collector.stderr and not db.exists()
    suite = tmp_path / "suite.json"
    suite.write_text("[]")
    evaluator = run("test_model.py", "--model", str(tiny_model), "--suite", str(suite), "--json", str(suite))
    assert evaluator.returncode == 2 and "--json" in evaluator.stderr and suite.read_text() == "[]"
