"""test_model.py never loses an evaluation nor overwrites what it reads: every flag, path and model is checked
before a model loads or the worker is called; a malformed score is a counted, reported failure, never NaN in the
means; a storing worker's POSTs are sent once; a dying worker or Ctrl-C leaves whole files or none."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, assert_refused, run, snapshot, start_worker
from fault_worker import FaultProxy, Reply, serve

SCRIPT = "test_model.py"
BEFORE_WORK_S = 5  # a refusal that takes longer than this probably loaded something first


def evaluate(*args, timeout: float = 120, **kwargs):
    return run(SCRIPT, "--max-new-tokens", "4", "-q", *args, timeout=timeout, **kwargs)


def strict_json(path: Path):
    """The file as JSON, failing on NaN or Infinity (which Python's json would otherwise accept)."""

    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def tree(*folders: Path) -> dict:
    """Every file under the folders, with its bytes: nothing may appear, vanish or change."""
    return {p: p.read_bytes() for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


class NoScoreWorker(FaultProxy):
    """A worker as the SAIGE contract describes it: no /api/score, so every score is stored (simulate-outcome)."""

    def __call__(self, method, path, headers, body):
        if path.split("?")[0] == "/api/score":
            return Reply(404, b"Not found", {"Content-Type": "text/plain"})
        return super().__call__(method, path, headers, body)


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory) -> dict:
    """Inputs and earlier outputs of every kind an evaluation could clobber."""
    d = tmp_path_factory.mktemp("inputs")
    row = {"context": "Hello there!", "person_state": {"vulnerability": "low", "mood": "neutral"}}
    (d / "suite.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    os.link(d / "suite.jsonl", d / "suite-link.jsonl")
    (d / "report.md").write_text("# last week's report\n")
    (d / "results.json").write_text('{"last": "week"}\n')
    os.symlink(d / "report.md", d / "report-alias.md")
    adapter = d / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model)}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (adapter / "saige_data.meta.json").write_text('{"prompt_template": null}')
    (d / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(24))
    (d / "zip.gguf").write_bytes(b"PK\x03\x04 a zip, not a model")
    (d / "empty-dir").mkdir()
    (d / "broken-model").mkdir()
    (d / "broken-model" / "config.json").write_text('{"model_type": "llama", ')
    (d / "list-adapter").mkdir()
    (d / "list-adapter" / "adapter_config.json").write_text("[]")
    (d / "models").mkdir()  # `models/adaptr` is a typo'd local path, not a hub id
    (d / "not-utf8.jsonl").write_bytes(b'{"context": "caf\xe9"}\n')
    return {"d": d, "adapter": adapter, "tiny": tiny_model}


@pytest.fixture(scope="module")
def counting_worker(worker_url):
    """A pass-through proxy: what it has seen proves whether a refused run called the worker."""
    proxy = FaultProxy(worker_url)
    with serve(proxy) as url:
        yield proxy, url


# (name, arguments (split at spaces) after --model and --worker-url, exit code, stderr pattern); {d}, {adapter},
# {tiny} are paths.
# --model defaults to the tiny model; a row that names its own --model replaces it.
# fmt: off
MATRIX = [
    # no output is an input (hard links and symlinks included), nor a file a model loads
    ("report-is-suite", "--suite {d}/suite.jsonl --report {d}/suite.jsonl", 2, "--report .* same file as --suite"),
    ("json-is-suite-hard-link", "--suite {d}/suite.jsonl --json {d}/suite-link.jsonl", 2, "same file as --suite"),
    ("plot-is-gguf-model", "--model {d}/model.gguf --plot {d}/model.gguf", 2, "--plot .* same file as --model"),
    ("json-is-adapter-config", "--model {adapter} --json {adapter}/adapter_config.json", 2, "a file it loads"),
    ("report-is-adapter-weights", "--model {adapter} --report {adapter}/adapter_model.safetensors", 2, "--model"),
    ("plot-is-data-sidecar", "--model {adapter} --plot {adapter}/saige_data.meta.json", 2, "same file as --model"),
    ("report-is-adapter-base-file", "--model {adapter} --report {tiny}/tokenizer.json", 2, "same file as --model"),
    ("json-is-compare-config", "--model {d}/model.gguf --compare {tiny} --json {tiny}/config.json", 2, "as --compare"),
    ("json-is-base-model-file", "--base-model {d}/model.gguf --json {d}/model.gguf", 2, "same file as --base-model"),
    # outputs differ from each other
    ("report-is-json", "--report {d}/report.md --json {d}/report.md", 2, "are the same file"),
    ("plot-is-report-by-symlink", "--report {d}/report.md --plot {d}/report-alias.md", 2, "are the same file"),
    # output folders exist and are writable
    ("report-folder-missing", "--report /nonexistent/dir/r.md", 2, "--report: folder /nonexistent/dir does not exist"),
    ("json-folder-unwritable", "--json /proc/results.json", 2, "--json: cannot write in folder /proc"),
    ("plot-is-a-folder", "--plot {d}/empty-dir", 2, "is a folder"),
    # flags out of range
    ("limit-zero", "--limit 0", 2, "--limit must be at least 1"),
    ("limit-negative", "--limit -1", 2, "--limit must be at least 1"),
    ("samples-zero", "--samples 0", 2, "--samples must be between 1 and"),
    ("batch-size-zero", "--batch-size 0", 2, "--batch-size must be between 1 and"),
    ("max-new-tokens-zero", "--max-new-tokens 0", 2, "--max-new-tokens must be between 1 and"),
    ("max-new-tokens-absurd", f"--max-new-tokens {10**12}", 2, "--max-new-tokens must be between 1 and"),
    ("bootstrap-zero", "--bootstrap 0", 2, "--bootstrap must be between 1 and"),
    ("bootstrap-absurd", f"--bootstrap {10**9}", 2, "--bootstrap must be between 1 and"),
    ("seed-negative", "--seed -1", 2, "--seed must be between 0 and"),
    ("temperature-negative", "--temperature -0.5", 2, "--temperature must be a finite number"),
    ("temperature-nan", "--temperature nan", 2, "--temperature must be a finite number"),
    ("temperature-inf", "--temperature inf --samples 2", 2, "--temperature must be a finite number"),
    ("top-p-zero", "--top-p 0", 2, "--top-p must be above 0 and at most 1"),
    ("top-p-above-one", "--top-p 1.5", 2, "--top-p must be above 0 and at most 1"),
    ("fail-below-above-ten", "--fail-below 11", 2, "--fail-below is a weighted score, 0 to 10"),
    ("fail-below-nan", "--fail-below nan", 2, "--fail-below is a weighted score"),
    ("scenario-ids-not-integers", "--scenario-ids 3,x", 2, "--scenario-ids takes integers"),
    ("worker-url-without-scheme", "--worker-url localhost:8787", 2, "--worker-url must be an http"),
    ("prompt-blank", ["--prompt", " "], 2, "--prompt is empty"),
    # models: found and of the right kind (these are local paths; a hub id is owner/name)
    ("model-dir-missing", "--model ./no-such-adapter", 1, r"'./no-such-adapter' \(--model\): not found"),
    ("model-typo-in-existing-folder", "--model models/adaptr", 1, "not found, no such file or folder"),
    ("compare-missing", "--compare /no/such/base", 1, r"\(--compare\): not found"),
    ("model-gguf-missing", "--model {d}/missing.gguf", 1, "model file not found"),
    ("model-gguf-not-gguf", "--model {d}/zip.gguf", 1, "is not a GGUF file"),
    ("model-dir-without-config", "--model {d}/empty-dir", 1, "no config.json or adapter_config.json"),
    ("model-config-broken", "--model {d}/broken-model", 1, "cannot read .*config.json"),
    ("adapter-config-not-object", "--model {d}/list-adapter", 1, "adapter_config.json is not a JSON object"),
    # --previous: an earlier run's --json, read before any generation, never written
    ("previous-missing", "--previous {d}/no-such-eval.json", 1, "--previous .*no such file"),
    ("previous-not-an-eval", "--previous {d}/suite.jsonl", 1, "not a --json file of test_model.py"),
    ("json-is-previous", "--suite {d}/suite.jsonl --previous {d}/p.json --json {d}/p.json", 2, "as --previous"),
    # the suite file
    ("suite-is-a-folder", "--suite {d}/empty-dir", 1, "--suite .* is a folder"),
    ("suite-not-utf8", "--suite {d}/not-utf8.jsonl", 1, "is not UTF-8 text"),
    ("suite-missing", "--suite {d}/nowhere.jsonl", 1, "suite file not found"),
]
# fmt: on


@pytest.mark.parametrize("name, extra, code, pattern", MATRIX, ids=[row[0] for row in MATRIX])
def test_bad_input_matrix(files, counting_worker, name, extra, code, pattern):
    proxy, url = counting_worker
    proxy.seen.clear()
    extra = extra.split() if isinstance(extra, str) else extra
    extra = [a.format(d=files["d"], adapter=files["adapter"], tiny=files["tiny"]) for a in extra]
    model = [] if "--model" in extra else ["--model", files["tiny"]]
    before = tree(files["d"], files["tiny"])
    started = time.monotonic()
    result = evaluate(*model, "--worker-url", url, *extra, cwd=files["d"])
    assert_refused(result, code, pattern, unchanged=snapshot(*before))
    assert tree(files["d"], files["tiny"]) == before, "a refused run created or changed a file"
    assert not proxy.seen, f"the worker was called before the refusal: {dict(proxy.seen)}"
    assert "answers in" not in result.stderr and time.monotonic() - started < BEFORE_WORK_S
    assert len([line for line in result.stderr.splitlines() if "error:" in line]) == 1, result.stderr


def test_report_typo_fails_at_once(tiny_model, counting_worker):
    """Hours of evaluation must never be lost to a typo in --report: it fails before anything starts."""
    proxy, url = counting_worker
    proxy.seen.clear()
    started = time.monotonic()
    result = evaluate("--model", tiny_model, "--worker-url", url, "--report", "/nonexistent/dir/r.md")
    elapsed = time.monotonic() - started
    assert_refused(result, 2, "folder /nonexistent/dir does not exist")
    assert elapsed < 2 and not proxy.seen, (elapsed, dict(proxy.seen))


@pytest.mark.parametrize(
    "fault, pattern",
    [
        ("html", "gave no usable scenario list"),
        ("not-object", "answered something other than an object with a 'scenarios' list"),
        ("scenarios-list-id", "the suite is empty"),
    ],
)
def test_bad_suite_reply_fails_before_loading(tiny_model, worker_url, fault, pattern):
    # the first GET is the worker check (/api/stats); the second fetches the suite
    with serve(FaultProxy(worker_url, get=["ok", fault])) as url:
        started = time.monotonic()
        result = evaluate("--model", tiny_model, "--worker-url", url)
    assert_refused(result, 1, pattern)
    assert "answers in" not in result.stderr and time.monotonic() - started < BEFORE_WORK_S
    if fault == "scenarios-list-id":
        assert "skipped" in result.stderr and "unusable" in result.stderr


def test_malformed_scores_are_counted_and_left_out(tiny_model, worker_url, tmp_path):
    """Five replies spoiled, two 500s retried (/api/score stores nothing): 7 of 12 scored, means finite, the five
    reported with their reasons; a file named like the old fixed temp file is left alone."""
    out = {"report": tmp_path / "r.md", "json": tmp_path / "r.json", "plot": tmp_path / "r.png"}
    bystanders = [tmp_path / "r.md.tmp", tmp_path / "r.json.tmp"]
    for path in bystanders:
        path.write_text("someone else's file\n")
    # the first POST is the probe for /api/score
    faults = ["ok", "nan", "infinity", "string-scores", "harm-string", "breakdown-list", "500", "500"]
    with serve(FaultProxy(worker_url, post=faults)) as url:
        result = evaluate(
            "--model", tiny_model, "--worker-url", url, "--limit", "12",
            "--report", out["report"], "--json", out["json"], "--plot", out["plot"],
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "nan" not in result.stdout.lower()
    assert "5 of 12 answers could not be scored" in result.stderr
    data = strict_json(out["json"])
    name = str(tiny_model)
    assert len(data["results"][name]) == 7 and len(data["unscored"][name]) == 5
    reasons = " ".join(r["error"] for r in data["unscored"][name])
    assert "not finite" in reasons and "not a number" in reasons and "breakdown is not an object" in reasons
    assert all(r["answer"] is not None for r in data["unscored"][name])
    summary = data["summaries"][name]
    assert summary["answers"] == 7 and summary["unscored_answers"] == 5 and 0 <= summary["weighted_score"] <= 10
    assert "5 of 12 answers could not be scored" in out["report"].read_text()
    assert out["plot"].read_bytes()[:4] == b"\x89PNG"
    assert all(p.read_text() == "someone else's file\n" for p in bystanders)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*(p.name for p in out.values()), *(p.name for p in bystanders)]
    )


def test_nothing_scored_keeps_the_answers_and_exits_1(tiny_model, worker_url, tmp_path):
    report, results = tmp_path / "r.md", tmp_path / "r.json"
    report.write_text("last week\n")
    faults = ["ok", "harm-nan", "no-assessment", "not-object", "html", "truncate"]
    with serve(FaultProxy(worker_url, post=faults)) as url:
        result = evaluate("--model", tiny_model, "--worker-url", url, "--limit", "5", "--report", report,
                          "--json", results)  # fmt: skip
    assert_refused(result, 1, rf"5 of 5 answers could not be scored: .*every answer is in {results}")
    data = strict_json(results)
    unscored = data["unscored"][str(tiny_model)]
    assert len(unscored) == 5 and data["results"][str(tiny_model)] == [] and data["incomplete"]
    assert {r["scenario_id"] for r in unscored} and all("answer" in r and r["error"] for r in unscored)
    assert report.read_text() == "last week\n", "a report of nothing replaced last week's"


def test_storing_scores_are_never_sent_twice(tiny_model, tmp_path):
    """Without /api/score every score is stored: a POST whose answer was lost is not retried, so each answer is
    stored exactly once, and the lost ones are counted."""
    db = tmp_path / "saige.db"
    with start_worker(db) as worker:
        rows_before = sqlite3.connect(db).execute("SELECT COUNT(*) FROM experiences").fetchone()[0]
        proxy = NoScoreWorker(worker, post=["stored-500", "stored-hangup"])
        with serve(proxy) as url:
            result = evaluate("--model", tiny_model, "--worker-url", url, "--limit", "5", "--json",
                              tmp_path / "r.json")  # fmt: skip
        rows = sqlite3.connect(db).execute("SELECT COUNT(*) FROM experiences").fetchone()[0] - rows_before
    assert result.returncode == 0, result.stderr
    assert "stores every evaluation answer" in result.stderr
    assert proxy.seen["POST", "/api/simulate-outcome"] == 5, dict(proxy.seen)
    assert rows == 5, f"{rows} experiences stored for 5 answers"
    assert "2 of 5 answers could not be scored" in result.stderr
    assert len(strict_json(tmp_path / "r.json")["results"][str(tiny_model)]) == 3


def test_worker_dying_mid_run_keeps_the_answers(tiny_model, worker_url, tmp_path):
    out = tmp_path / "r.json"
    with serve(FaultProxy(worker_url, die_after_posts=3)) as url:  # the probe, then two scores
        result = evaluate("--model", tiny_model, "--worker-url", url, "--limit", "6", "--json", out)
    assert_refused(result, 1, rf"stopped answering: 2 of 6 answers .* were scored; every answer is in {out}")
    data = strict_json(out)
    name = str(tiny_model)
    assert len(data["results"][name]) == 2 and len(data["unscored"][name]) == 4
    assert all(isinstance(r["answer"], str) for r in data["unscored"][name])


def test_ctrl_c_exits_130_at_once_and_writes_nothing(tiny_model, worker_url, tmp_path):
    report, results = tmp_path / "r.md", tmp_path / "r.json"
    report.write_text("last week\n")
    results.write_text("{}\n")
    before = tree(tmp_path)
    proxy = FaultProxy(worker_url, post=["ok"] + ["stall"] * 8)  # scoring hangs: Ctrl-C while it waits
    with serve(proxy) as url:
        cmd = [sys.executable, str(ROOT / SCRIPT), "--model", str(tiny_model), "--worker-url", url, "--limit", "4",
               "--max-new-tokens", "4", "-q", "--report", str(report), "--json", str(results)]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while proxy.seen["POST", "/api/score"] < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        _, stderr = proc.communicate(timeout=30)
        elapsed = time.monotonic() - interrupted
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert elapsed < 2, f"{elapsed:.1f}s from Ctrl-C to exit"
    assert tree(tmp_path) == before
