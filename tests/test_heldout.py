"""The held-out split that works on any worker: collector, converter and evaluator agree on it, run as users run
them against a worker that behaves like the real SAIGE worker (saige_worker.py --strict-contract)."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest
import requests
import saige_db
from conftest import ROOT, run, start_worker

sys.path.insert(0, str(ROOT / "shared_blocks"))
from heldout import HELDOUT_FRACTION, is_heldout  # noqa: E402

BANK = json.loads((ROOT / "data" / "scenarios.json").read_text())


def held(contexts, fraction: float = HELDOUT_FRACTION) -> set[str]:
    return {c for c in contexts if is_heldout(c, fraction)}


def collect(url: str, *args) -> dict:
    result = run(
        "collect_experiences.py",
        "--worker-url",
        url,
        "--backend",
        "echo",
        "--difficulty",
        "5",
        "--quiet",
        "--json",
        *args,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def contexts(db: Path, sql: str) -> list[str]:
    return [r[0] for r in sqlite3.connect(db).execute(sql)]


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """A worker like the real one (the contract's endpoints only, every scenario served) and a collection into a
    local --db, holding out the pipeline's default fraction."""
    folder = tmp_path_factory.mktemp("strict")
    with start_worker(folder / "worker.db", "--strict-contract", "--seed", "3") as url:
        summary = collect(url, "--episodes", "60", "--heldout-fraction", "0.25", "--db", folder / "local.db")
        yield url, folder, summary


def test_the_split_is_a_stable_share_of_scenarios_decided_by_their_text():
    texts = [s["context"] for s in BANK]
    assert 10 <= len(held(texts)) <= 30  # about a quarter of the 100 bank scenarios
    assert held(texts, 0.25) <= held(texts, 0.5)  # held out at 0.25 stays held out at any larger fraction
    assert not held(texts, 0) and held(texts, 0.99) != set()
    one = next(iter(held(texts)))
    assert is_heldout("  " + one.replace(" ", "\n  ") + " ", 0.25)  # whitespace does not move a scenario
    assert not is_heldout(None, 0.5)


def test_a_strict_contract_worker_has_no_extras_and_no_split(strict, tmp_path):
    url = strict[0]
    for path in ("/api/scenarios", "/health"):
        reply = requests.get(url + path, timeout=10)
        assert (reply.status_code, reply.text) == (404, "Not found")
    score = requests.post(url + "/api/score", json={"scenario": {"context": "Hi"}, "response": "Hello"}, timeout=10)
    assert score.status_code == 404
    worker_heldout = {s["context"] for s in BANK if s.get("split") == "heldout"}
    drawn = {requests.get(url + "/api/get-scenario?difficulty=5", timeout=10).json()["context"] for _ in range(80)}
    assert drawn & worker_heldout  # the real worker has no split: any scenario may come


def test_the_collector_never_answers_a_heldout_scenario_and_keeps_its_row(strict):
    _, folder, summary = strict
    db = folder / "local.db"
    answered = contexts(db, "SELECT s.context FROM experiences e JOIN scenarios s ON s.id = e.scenario_id")
    assert len(answered) == summary["scored"] == 60 and not held(answered)
    kept = contexts(db, "SELECT context FROM scenarios")
    assert held(kept) and len(held(kept)) == summary["heldout"]["scenarios_seen"]
    assert summary["heldout"]["draws_skipped"] >= summary["heldout"]["scenarios_seen"]
    # the worker's ids are kept, so a scenario of this copy can be scored by id on the worker
    worker_ids = dict(sqlite3.connect(folder / "worker.db").execute("SELECT context, id FROM scenarios"))
    assert all(worker_ids[c] == i for i, c in sqlite3.connect(db).execute("SELECT id, context FROM scenarios"))


def test_the_converter_leaves_out_heldout_scenarios_and_the_local_workers_split(tmp_path):
    db = tmp_path / "worker.db"
    with start_worker(db) as url:
        collect(url, "--episodes", "120")  # the local worker serves its train split only
        worker_heldout = requests.get(url + "/api/scenarios?split=heldout", timeout=10).json()["scenarios"][:3]
        for s in worker_heldout:  # answers on its held-out split (an evaluation through a storing call)
            body = {"scenario_id": s["id"], "response": s["expected_response"]}
            assert requests.post(url + "/api/simulate-outcome", json=body, timeout=10).status_code == 200
    loose = ("--max-harm", "1", "--min-buddhist", "0", "--min-alignment", "low", "--include-gold")
    lines = {}
    for fraction in ("0", "0.25"):
        out = tmp_path / f"out-{fraction}.jsonl"
        result = run(
            "saige_to_sft.py",
            "--db",
            db,
            "-o",
            out,
            "--output-format",
            "jsonl",
            "--layout",
            "messages",
            "--heldout-fraction",
            fraction,
            *loose,
        )
        assert result.returncode == 0, result.stderr
        lines[fraction] = [json.loads(x) for x in out.read_text().splitlines()]
        meta = json.loads(Path(f"{out}.meta.json").read_text())
        assert meta["filters"]["heldout_fraction"] == float(fraction)
    users = {f: {m["messages"][1]["content"] for m in rows} for f, rows in lines.items()}
    worker_split = {s["context"] for s in worker_heldout}
    assert not any(c in u for u in users["0"] for c in worker_split)  # the worker's evaluation answers: never
    trained_everywhere = {s["context"] for s in BANK if s.get("split") != "heldout"}
    left_out = held(trained_everywhere)
    assert any(c in u for u in users["0"] for c in left_out)
    assert not any(c in u for u in users["0.25"] for c in left_out)  # neither answers nor gold
    assert len(lines["0.25"]) < len(lines["0"])
    assert meta["counts"]["removed_heldout"] > 0 and meta["heldout_scenarios"] >= 25


def test_the_evaluator_builds_its_suite_from_the_database_when_the_worker_cannot_list(strict, tiny_model, tmp_path):
    url, folder, _ = strict
    report = tmp_path / "eval.json"
    base = ("--model", tiny_model, "--worker-url", url, "--max-new-tokens", "4", "-q")
    result = run("test_model.py", *base, "--db", folder / "local.db", "--limit", "3", "--json", report, timeout=300)
    assert result.returncode == 0, result.stderr
    records = next(iter(json.loads(report.read_text())["results"].values()))
    assert len(records) == 3 and held(r["context"] for r in records) == {r["context"] for r in records}
    assert "suite: the heldout side of --db" in result.stderr
    # those answers were stored by the worker (it has no /api/score) and are on held-out scenarios only
    assert "stores every evaluation answer" in result.stderr

    refused = run("test_model.py", *base)
    assert refused.returncode == 1 and "pass --suite FILE, or --db saige.db" in refused.stderr
    assert refused.stderr.count("\n") == 1


def test_the_evaluator_reads_a_d1_export_as_its_database(strict, tiny_model, tmp_path):
    url, folder, _ = strict
    export = tmp_path / "saige-export.sql"
    saige_db.wrangler_export(folder / "local.db", export)
    suites = {}
    for db in (folder / "local.db", export):
        report = tmp_path / f"{db.name}.json"
        args = ("--model", tiny_model, "--worker-url", url, "--max-new-tokens", "2", "-q", "--limit", "2")
        result = run("test_model.py", *args, "--db", db, "--json", report, timeout=300)
        assert result.returncode == 0, result.stderr
        suites[db.name] = [r["context"] for r in next(iter(json.loads(report.read_text())["results"].values()))]
    assert suites["local.db"] == suites["saige-export.sql"] and len(suites["local.db"]) == 2


def test_an_evaluation_suite_file_is_held_out_too(tmp_path):
    """EVAL_SUITE's scenarios: the collector never answers them and the converter leaves them out."""
    suite_rows = [s for s in BANK if s.get("split") != "heldout" and not is_heldout(s["context"], 0.25)][:30]
    suite = tmp_path / "suite.jsonl"
    suite.write_text("".join(json.dumps({**s, "context": "  " + s["context"]}) + "\n" for s in suite_rows))
    contexts_of_suite = {s["context"] for s in suite_rows}
    with start_worker(tmp_path / "worker.db", "--strict-contract", "--seed", "5") as url:
        summary = collect(url, "--episodes", "40", "--heldout-suite", suite, "--db", tmp_path / "local.db")
        everything = collect(url, "--episodes", "60", "--db", tmp_path / "all.db")
    answered = contexts(
        tmp_path / "local.db", "SELECT s.context FROM experiences e JOIN scenarios s ON s.id = e.scenario_id"
    )
    assert summary["scored"] == 40 and not set(answered) & contexts_of_suite
    assert summary["heldout"]["scenarios_seen"] > 0
    assert everything["scored"] == 60
    out = tmp_path / "out.jsonl"
    loose = ("--max-harm", "1", "--min-buddhist", "0", "--min-alignment", "low", "--output-format", "jsonl")
    args = ("--db", tmp_path / "all.db", "-o", out, "--layout", "messages", *loose, "--heldout-suite", suite)
    result = run("saige_to_sft.py", *args)
    assert result.returncode == 0, result.stderr
    users = [json.loads(x)["messages"][1]["content"] for x in out.read_text().splitlines()]
    assert users and not any(c in u for u in users for c in contexts_of_suite)
    assert json.loads(Path(f"{out}.meta.json").read_text())["counts"]["removed_heldout"] > 0


@pytest.mark.parametrize("script", ["saige_to_sft.py", "collect_experiences.py"])
def test_a_heldout_suite_that_is_not_scenarios_is_one_line(script, tmp_path):
    bad = tmp_path / "suite.json"
    bad.write_text("[1, 2")
    extra = {"saige_to_sft.py": ("--db", tmp_path / "none.db")}
    result = run(script, "--heldout-suite", bad, *extra.get(script, ()))
    assert result.returncode == 2 and "--heldout-suite: cannot read the scenarios of" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("script", "value", "message"),
    [
        ("saige_to_sft.py", "1.5", "between 0 and 1"),
        ("collect_experiences.py", "1", "1 would hold out every scenario"),
        ("test_model.py", "0", "above 0 and below 1"),
        ("test_model.py", "nan", "above 0 and below 1"),
    ],
)
def test_a_heldout_fraction_out_of_range_is_one_line(script, value, message, tmp_path):
    extra = {"test_model.py": ("--model", "offline"), "saige_to_sft.py": ("--db", tmp_path / "none.db")}
    result = run(script, "--heldout-fraction", value, *extra.get(script, ()))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
