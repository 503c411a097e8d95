"""train_pipeline.sh end to end: a tiny model, a local worker it starts itself, one short iteration."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pty
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import ROOT, start_worker
from fault_worker import FaultProxy, serve

SCRIPT = ROOT / "train_pipeline.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings(tmp_path: Path, model: Path, **extra: str) -> dict:
    """Tiny, fast settings: a handful of episodes, one short training, two held-out scenarios."""
    return {
        **os.environ,
        "PYTHON": sys.executable,
        "DB_PATH": str(tmp_path / "saige.db"),
        "OUTPUT_DIR": str(tmp_path / "out"),
        "WORKER_URL": f"http://127.0.0.1:{free_port()}",
        "MODEL": str(model),
        "FORMAT": "chatml",
        "TRAINING_EPISODES": "6",
        "SAMPLES_PER_SCENARIO": "2",
        "MAX_NEW_TOKENS": "8",
        "EPOCHS": "1",
        "EVAL_LIMIT": "2",
        "MAX_HARM": "1",
        "MIN_BUDDHIST": "0",
        "MIN_ALIGNMENT": "low",
        **extra,
    }


def pipeline(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def workers_on(db: Path) -> list[str]:
    """Processes still running saige_worker.py on this test's database (none may outlive the pipeline)."""
    found = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in found if "saige_worker.py" in line and str(db) in line]


@pytest.mark.slow  # a whole training run or pipeline: `make test-slow` (CI runs both)
def test_one_iteration_end_to_end(tiny_model, tmp_path):
    env = settings(tmp_path, tiny_model, BEST_PER_SCENARIO="1", TRIM_UNFINISHED="1", EVAL_MAX_NEW_TOKENS="12")
    result = pipeline(env)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = {line.split("] ")[1].split(":")[0]: line for line in result.stderr.splitlines() if "] " in line}
    assert "--max-new-tokens 8 " in steps["collect"] and "--max-new-tokens 12 " in steps["evaluate"]
    it = tmp_path / "out" / "iter-1"
    for name in [
        "episodes.jsonl",
        "train.csv",
        "train.csv.meta.json",
        "collect.log",
        "train.log",
        "eval.md",
        "eval.json",
        "eval.png",
        "eval.log",
        "adapter/adapter_model.safetensors",
        "adapter/training_summary.json",
        "adapter/saige_data.meta.json",
    ]:
        assert (it / name).is_file(), name
    assert len((it / "episodes.jsonl").read_text().splitlines()) == 6
    stages = [line.split("\t") for line in (it / "stage_seconds.tsv").read_text().splitlines()]
    assert [name for name, _ in stages] == ["collect", "convert", "train", "evaluate"]
    assert all(seconds.isdigit() for _, seconds in stages) and "] train took " in result.stderr
    meta = json.loads((it / "train.csv.meta.json").read_text())
    assert meta["filters"]["best_per_scenario"] == 1 and meta["filters"]["trim_unfinished"] is True
    assert meta["counts"]["written"] == 3  # 6 episodes = 3 scenarios x 2 samples, the best of each kept
    evaluation = json.loads((it / "eval.json").read_text())
    assert evaluation["comparison"]["scenarios"] == 2
    assert "starting the local saige_worker.py" in result.stderr and "stopped the local worker" in result.stderr
    table = result.stdout.splitlines()
    assert table[0].split()[:3] == ["iter", "examples", "train"] and table[1].split()[0] == "1"
    assert (tmp_path / "out" / "summary.txt").read_text() == result.stdout
    assert not workers_on(tmp_path / "saige.db")
    for log in ("collect.log", "train.log", "eval.log"):  # library deprecation notes are not the user's to act on
        assert "Warning" not in (it / log).read_text(), log


def run_in_terminal(env: dict, timeout: float = 600) -> tuple[int, str]:
    """The pipeline with its stderr on a pseudo-terminal, as a person runs it: (exit code, what the terminal got)."""
    main, terminal = pty.openpty()
    process = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    shown = b""
    with contextlib.suppress(OSError):  # EIO once the last writer has closed the terminal
        while chunk := os.read(main, 65536):
            shown += chunk
    os.close(main)
    return process.wait(timeout=timeout), shown.decode("utf-8", "replace")


@pytest.mark.slow
def test_in_a_terminal_each_step_shows_its_progress_bar_and_logs_only_its_last_state(tiny_model, tmp_path):
    code, shown = run_in_terminal(settings(tmp_path, tiny_model, EVAL_MAX_NEW_TOKENS="12"))
    assert code == 0, shown[-3000:]
    it = tmp_path / "out" / "iter-1"
    for log, bar in [("collect.log", "Collecting"), ("train.log", "Training"), ("eval.log", "Generating")]:
        assert f"\r{bar}" in shown, bar  # redrawn in place on the terminal
        text = (it / log).read_text()
        assert "\r" not in text and re.search(rf"^{bar}: +100%", text, re.M), (log, text[-500:])


@pytest.mark.slow
def test_the_second_iteration_is_compared_with_the_first_and_the_best_adapter_kept(tiny_model, tmp_path):
    env = settings(tmp_path, tiny_model, ITERATIONS="2", STOP_WHEN_WORSE="0", EVAL_SAMPLES="2")
    result = pipeline(env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    first, second = (json.loads((out / f"iter-{i}" / "eval.json").read_text()) for i in (1, 2))
    assert "previous" not in first
    assert second["previous"]["model"] == str(out / "iter-1" / "adapter")
    assert second["previous"]["comparison"]["scenarios"] == 2
    assert "] iteration 2 against iteration 1: " in result.stderr
    scores = [next(iter(e["summaries"].values()))["weighted_score"] for e in (first, second)]
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["weighted_score"] == max(scores) and best["iteration"] == 1 + scores.index(max(scores))
    adapter = out / f"iter-{best['iteration']}" / "adapter" / "adapter_model.safetensors"
    assert (out / "best" / "adapter_model.safetensors").read_bytes() == adapter.read_bytes()
    header, _, row2 = result.stdout.splitlines()[:3]
    assert "vs previous (95% CI)" in header and "distinct-2" in header
    assert f"{second['previous']['comparison']['mean_difference']:+.2f} (" in row2


@pytest.mark.slow
def test_pool_current_trains_each_iteration_only_on_what_it_collected(tiny_model, tmp_path):
    """POOL=current selects only the iteration's own answers; START_FROM=previous continues the adapter before."""
    env = settings(tmp_path, tiny_model, ITERATIONS="2", STOP_WHEN_WORSE="0", SKIP_EVAL="1", POOL="current",
                   START_FROM="previous", LEARNING_RATE="3e-4", CONTINUE_LEARNING_RATE="1e-4")  # fmt: skip
    result = pipeline(env)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (json.loads((tmp_path / "out" / f"iter-{i}" / "train.csv.meta.json").read_text()) for i in (1, 2))
    # each iteration's recorded answers: up to 6, since the tiny model's babble is now and then empty (not posted)
    n1, n2 = (len((tmp_path / "out" / f"iter-{i}" / "episodes.jsonl").read_text().splitlines()) for i in (1, 2))
    assert n1 >= 4 and n2 >= 4
    assert second["source_rows"]["experiences"] == n1 + n2 and second["filters"]["since"] > first["filters"]["since"]
    assert first["counts"]["removed_scope"] == 0 and second["counts"]["removed_scope"] == n1  # iteration 1's answers
    assert (first["counts"]["written"], second["counts"]["written"]) == (n1, n2)
    started = [json.loads((tmp_path / "out" / f"iter-{i}" / "adapter" / "training_summary.json").read_text())["args"]
               for i in (1, 2)]  # fmt: skip
    assert started[0]["init_adapter"] is None and started[1]["init_adapter"] == str(tmp_path / "out/iter-1/adapter")
    assert [a["learning_rate"] for a in started] == [3e-4, 1e-4]


@pytest.mark.slow
def test_with_ollama_each_tuned_model_is_registered_and_answers_the_next_iteration(tiny_model, tmp_path):
    from ollama_stub import OllamaStub

    stub = OllamaStub(["base:1b"])
    with serve(stub) as url:
        env = settings(tmp_path, tiny_model, BACKEND="ollama", OLLAMA_MODEL="base:1b", OLLAMA_URL=url,
                       ITERATIONS="2", STOP_WHEN_WORSE="0")  # fmt: skip
        result = pipeline(env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    assert [c["model"] for c in stub.created] == ["saige-tuned:iter-1", "saige-tuned:iter-2"]
    first = stub.created[0]
    adapter = (out / "iter-1" / "adapter" / "ollama" / "adapter.gguf").read_bytes()
    assert first["adapters"] == {"adapter.gguf": "sha256:" + hashlib.sha256(adapter).hexdigest()}
    assert first["from"] == "base:1b" and "<|im_start|>" in first["template"]
    assert first["parameters"] == {"stop": ["<|im_end|>"]}
    for i, model in ((1, "base:1b"), (2, "saige-tuned:iter-1")):  # iteration 2 is answered by the tuned model
        episodes = [json.loads(line) for line in (out / f"iter-{i}" / "episodes.jsonl").read_text().splitlines()]
        assert episodes and {e["model"] for e in episodes} == {model}
    assert "registered saige-tuned:iter-2 with Ollama" in result.stderr


def test_an_openai_server_the_pipeline_does_not_run_gets_a_warning_for_later_iterations(tiny_model, tmp_path):
    env = settings(tmp_path, tiny_model, BACKEND="openai", ITERATIONS="2", WORKER_URL="https://127.0.0.1:9")
    result = pipeline(env)  # stops at the unreachable worker, after the warning
    assert result.returncode == 1
    assert "BACKEND=openai without SERVER: every iteration collects from what http://localhost:8000/v1" in result.stderr


def test_ollama_backend_without_its_tag_is_refused_before_any_work(tiny_model, tmp_path):
    result = pipeline(settings(tmp_path, tiny_model, BACKEND="ollama"))
    assert result.returncode == 1 and "BACKEND=ollama needs OLLAMA_MODEL" in result.stderr
    assert not (tmp_path / "saige.db").exists()


def fake_iteration(out: Path, i: int, score: float, ci95: tuple[float, float] | None = None) -> None:
    """What an evaluated iteration leaves: an adapter and an eval.json (with the comparison to the one before)."""
    (out / f"iter-{i}" / "adapter").mkdir(parents=True)
    (out / f"iter-{i}" / "adapter" / "adapter_model.safetensors").write_text(f"weights of iteration {i}")
    evaluation = {"summaries": {"adapter": {"weighted_score": score}, "base": {"weighted_score": 4.0}}}
    if ci95:
        evaluation["previous"] = {"comparison": {"mean_difference": sum(ci95) / 2, "ci95": list(ci95)}}
    (out / f"iter-{i}" / "eval.json").write_text(json.dumps(evaluation))


def judge_iteration(out: Path, i: int) -> subprocess.CompletedProcess:
    """The pipeline's own verdict after evaluating iteration i (the script sourced, its function called)."""
    env = {**os.environ, "OUTPUT_DIR": str(out), "PYTHON": sys.executable}
    command = f'source "{SCRIPT}" && better_or_same {i}'
    return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60)


def test_the_best_adapter_is_kept_and_a_worse_iteration_stops_the_loop(tmp_path):
    out = tmp_path / "out"
    fake_iteration(out, 1, 5.0)
    assert judge_iteration(out, 1).returncode == 0
    fake_iteration(out, 2, 5.5, (0.1, 0.9))
    result = judge_iteration(out, 2)
    assert result.returncode == 0 and "iteration 2 against iteration 1: +0.500" in result.stderr
    assert json.loads((out / "best" / "best.json").read_text()) == {"iteration": 2, "weighted_score": 5.5}
    fake_iteration(out, 3, 4.0, (-2.0, -0.5))  # worse, CI below zero: the loop stops, the best stays iteration 2
    result = judge_iteration(out, 3)
    assert result.returncode == 1 and "best adapter so far: iteration 2" in result.stderr
    assert (out / "best" / "adapter_model.safetensors").read_text() == "weights of iteration 2"
    assert not (out / "best.new").exists() and not (out / "best.old").exists()
    fake_iteration(out, 4, 5.2, (-0.3, 1.4))  # not distinguishable from iteration 3: the loop goes on
    assert judge_iteration(out, 4).returncode == 0


@pytest.mark.slow  # a whole training run or pipeline: `make test-slow` (CI runs both)
@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_one_iteration_with_dpo_or_grpo(tiny_model, tmp_path, method):
    # 8 sampled answers per scenario: the tiny model's babble scores differently, so a scenario yields a pair (with 4,
    # 2 of 18 collections had none once off-topic babble cost the same at any length; with 8, 30 of 30 had one, but
    # one unseeded CI run of 2026-12-04 had none: seeded, it is the same on every run of one machine)
    pairs = {"DPO_PAIRS": "each", "DPO_MARGIN": "0.1"} if method == "dpo" else {}  # each worse, not the worst
    env = settings(tmp_path, tiny_model, METHOD=method, SAMPLES_PER_SCENARIO="8", TRAINING_EPISODES="16", EPOCHS="1",
                   EVAL_SAMPLES="2", SEED="1", **pairs)  # fmt: skip
    result = pipeline(env)
    assert result.returncode == 0, result.stderr[-3000:]
    it = tmp_path / "out" / "iter-1"
    summary = json.loads((it / "adapter" / "training_summary.json").read_text())
    assert summary["method"] == method
    assert (it / "pairs.jsonl").is_file() == (method == "dpo")
    if method == "dpo":
        written = [json.loads(line) for line in (it / "pairs.jsonl").read_text().splitlines()]
        # the setting reached the converter; which pairs `each` makes is checked exactly on a graded database in
        # test_converter (here they depend on the tiny model's babble: one CI machine's seeded collection gave 1 pair)
        meta = json.loads((it / "pairs.jsonl.meta.json").read_text())
        assert (meta["dpo_pairs"], meta["dpo_margin"]) == ("each", 0.1)
        assert written and all(p["chosen"] != p["rejected"] for p in written)
    assert (it / "train.csv").is_file() == (method == "dpo")  # GRPO needs no conversion
    evaluation = json.loads((it / "eval.json").read_text())
    assert evaluation["comparison"]["scenarios"] == 2 and evaluation["config"]["samples"] == 2
    rows = summary["train_rows"] + summary["eval_rows"]
    assert result.stdout.splitlines()[1].split()[:2] == ["1", str(rows)]
    assert not workers_on(tmp_path / "saige.db")


def test_zero_match_stops_with_the_converter_hints(tiny_model, tmp_path):
    env = settings(tmp_path, tiny_model, MIN_BUDDHIST="10", MIN_ALIGNMENT="excellent", MAX_HARM="0")
    result = pipeline(env)
    assert result.returncode == 1
    assert "No experiences found matching criteria" in result.stderr
    assert "no experience passed the thresholds" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "iter-1" / "adapter").exists()
    assert not workers_on(tmp_path / "saige.db")


def test_failed_step_names_itself_and_stops_the_worker(tmp_path, tiny_model):
    (tmp_path / "not-a-model").mkdir()  # exists, so the pipeline's own checks pass; the collector refuses it
    env = settings(tmp_path, tmp_path / "not-a-model")
    result = pipeline(env)
    assert result.returncode == 1
    assert "step 'collect' failed" in result.stderr and "collect.log" in result.stderr
    assert not workers_on(tmp_path / "saige.db")


def test_ctrl_c_stops_everything(tiny_model, tmp_path):
    env = settings(tmp_path, tiny_model, TRAINING_EPISODES="200")
    proc = subprocess.Popen(
        ["bash", str(SCRIPT)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not workers_on(tmp_path / "saige.db"):
        assert time.monotonic() < deadline and proc.poll() is None, "the worker never started"
        time.sleep(0.2)
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    time.sleep(0.5)
    assert not workers_on(tmp_path / "saige.db")


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("MIN_ALIGNMENT", "great", "MIN_ALIGNMENT=great: use low, moderate, good or excellent"),
        ("TRAINING_EPISODES", "many", "TRAINING_EPISODES=many: must be a positive integer"),
        ("MAX_HARM", "2", "MAX_HARM=2: a number from 0 to 1"),
        ("FORMAT", "alpaca", "FORMAT=alpaca"),
        ("METHOD", "ppo", "METHOD=ppo: use sft, dpo or grpo"),
        ("STOP_WHEN_WORSE", "yes", "STOP_WHEN_WORSE=yes: use 0 or 1"),
        ("BEST_PER_SCENARIO", "0", "BEST_PER_SCENARIO=0: a positive integer, or empty for all"),
        ("EVAL_MAX_NEW_TOKENS", "0", "EVAL_MAX_NEW_TOKENS=0: must be a positive integer"),
        ("POOL", "best", "POOL=best: all or current"),
        ("START_FROM", "last", "START_FROM=last: base or previous"),
        ("DPO_PAIRS", "all", "DPO_PAIRS=all: worst or each"),
        ("CONTINUE_LEARNING_RATE", "fast", "CONTINUE_LEARNING_RATE=fast: must be a number above 0 up to 1"),
        ("DPO_MARGIN", "-1", "DPO_MARGIN=-1: must be a number from 0 up to 10"),
        ("PROGRESS", "yes", "PROGRESS=yes: auto, 0 or 1"),
    ],
)
def test_bad_setting_is_one_clear_line(tmp_path, tiny_model, name, value, message):
    result = pipeline(settings(tmp_path, tiny_model, **{name: value}))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"train_pipeline.sh: error: {message}" or message in result.stderr


def test_help_lists_every_setting_with_its_default():
    result = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for name, default in [
        ("DB_PATH", "../saige.db"),
        ("WORKER_URL", "http://localhost:8787"),
        ("TRAINING_EPISODES", "50"),
        ("MAX_HARM", "0.25"),
        ("MIN_BUDDHIST", "6.5"),
        ("MIN_ALIGNMENT", "good"),
        ("FORMAT", "mistral"),
        ("ITERATIONS", "1"),
        ("METHOD", "sft"),
        ("POOL", "all"),
        ("START_FROM", "base"),
        ("DPO_PAIRS", "worst"),
        ("DPO_MARGIN", "1.0"),
    ]:
        line = next(x for x in result.stdout.splitlines() if x.startswith(name + " "))
        assert line.split()[1] == default, line
    for name in [
        "OUTPUT_DIR",
        "MODEL",
        "BACKEND",
        "SAMPLES_PER_SCENARIO",
        "CONCURRENCY",
        "EPOCHS",
        "SKIP_COLLECT",
        "SKIP_TRAIN",
        "SKIP_EVAL",
        "USE_4BIT",
        "CONTINUE_LEARNING_RATE",
    ]:
        assert any(x.startswith(name + " ") for x in result.stdout.splitlines()), name
    bad = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


# --- a worker like the user's own: the contract's API only -----------------------------------------------
@contextlib.contextmanager
def contract_only_worker(tmp_path: Path):
    """A local worker behind a proxy that answers like the real SAIGE worker: no /api/scenarios, no /api/score.
    Yields (the worker's own URL, the proxied URL)."""
    with start_worker(tmp_path / "worker.db") as direct:
        with serve(FaultProxy(direct, hide=("/api/scenarios", "/api/score"))) as proxied:
            yield direct, proxied


def test_without_a_heldout_split_of_any_kind_the_loop_is_refused_before_collecting(tiny_model, tmp_path):
    with contract_only_worker(tmp_path) as (_, url):
        result = pipeline(settings(tmp_path, tiny_model, WORKER_URL=url, HELDOUT_FRACTION="0"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "set HELDOUT_FRACTION" in errors[0] and "EVAL_SUITE=FILE" in errors[0]
    assert not (tmp_path / "out" / "iter-1").exists()  # refused before any collection


@pytest.mark.slow  # a whole training run or pipeline: `make test-slow` (CI runs both)
def test_the_loop_finishes_against_a_worker_like_the_real_one_and_never_trains_on_what_it_evaluates(
    tiny_model, tmp_path
):
    """The real SAIGE worker: no /api/scenarios, no /api/score, no split; simulate-outcome stores every answer,
    the evaluator's too. The hashed held-out split keeps the evaluation apart from training, now and next time."""
    worker_db = tmp_path / "worker.db"
    with start_worker(worker_db, "--strict-contract", "--seed", "7") as url, start_worker(tmp_path / "j.db") as judge:
        assert requests.get(url + "/api/scenarios", timeout=10).status_code == 404
        env = settings(tmp_path, tiny_model, WORKER_URL=url, BACKEND="echo", TRAINING_EPISODES="60")
        result = pipeline({**env, "SAMPLES_PER_SCENARIO": "1", "EVAL_LIMIT": "4", "JUDGES": judge, "GAIN_UNDER": "all"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hashes into HELDOUT_FRACTION=0.25" in result.stderr
    # the summary shows the gain under every judge: the worker trained against, the other worker, chrF
    gains = result.stdout.split("gain under every judge (GAIN_UNDER=all")[1]
    assert f"{url} (trained against):" in gains and f"{judge}:" in gains and "chrF vs expected_response" in gains
    assert re.search(r"\) +(yes|no) ", result.stdout.splitlines()[1])  # the "improved" column, after the delta's CI
    it = tmp_path / "out" / "iter-1"
    trained = {json.loads(line)["scenario"]["context"] for line in (it / "episodes.jsonl").read_text().splitlines()}
    evaluation = json.loads((it / "eval.json").read_text())
    evaluated = {r["context"] for rs in evaluation["results"].values() for r in rs}
    assert evaluated and not evaluated & trained  # evaluated only on scenarios never answered for training
    assert evaluation["config"]["db"] == env["DB_PATH"] and 1 <= evaluation["comparison"]["scenarios"] <= 4
    # the worker stored the evaluation answers; converting its database (as after a D1 sync) leaves them out
    answers = sqlite3.connect(worker_db).execute(
        "SELECT s.context, e.ai_response FROM experiences e JOIN scenarios s ON s.id = e.scenario_id"
    )
    stored = {answer for context, answer in answers if context in evaluated}
    assert stored  # the real worker stores what it scores
    out = tmp_path / "next.jsonl"
    convert = subprocess.run(
        [
            sys.executable,
            str(ROOT / "saige_to_sft.py"),
            "--db",
            str(worker_db),
            "-o",
            str(out),
            "--output-format",
            "jsonl",
            "--layout",
            "prompt-completion",
            "--heldout-fraction",
            "0.25",
            "--max-harm",
            "1",
            "--min-buddhist",
            "0",
            "--min-alignment",
            "low",
        ],
        capture_output=True,
        text=True,
    )
    assert convert.returncode == 0, convert.stderr
    completions = {json.loads(line)["completion"].strip() for line in out.read_text().splitlines()}
    assert completions and not completions & {a.strip() for a in stored}
    assert "Held out:" in convert.stderr


def test_eval_suite_must_be_a_file_other_than_the_database(tiny_model, tmp_path):
    missing = pipeline(settings(tmp_path, tiny_model, EVAL_SUITE=str(tmp_path / "nope.json")))
    assert missing.returncode == 1 and "EVAL_SUITE=" in missing.stderr and "no such file" in missing.stderr
    db = tmp_path / "saige.db"
    db.write_bytes(b"")
    clash = pipeline(settings(tmp_path, tiny_model, EVAL_SUITE=str(db)))
    assert clash.returncode == 1 and "is the database DB_PATH" in clash.stderr


@pytest.mark.slow  # a whole training run or pipeline: `make test-slow` (CI runs both)
def test_eval_suite_lets_the_loop_finish_against_a_worker_without_extras(tiny_model, tmp_path):
    with contract_only_worker(tmp_path) as (direct, url):
        heldout = requests.get(direct + "/api/scenarios?split=heldout", timeout=10).json()["scenarios"][:4]
        suite = tmp_path / "heldout.json"
        suite.write_text(json.dumps(heldout))
        # 4 scenarios: the worker refuses an empty answer (the tiny model's babble can be one), and the evaluator
        # reports a run where most answers go unscored as failed
        result = pipeline(settings(tmp_path, tiny_model, WORKER_URL=url, EVAL_SUITE=str(suite), EVAL_LIMIT="4"))
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads((tmp_path / "out" / "iter-1" / "eval.json").read_text())
    assert evaluation["config"]["suite"] == str(suite) and 1 <= evaluation["comparison"]["scenarios"] <= 4
    episodes = (tmp_path / "out" / "iter-1" / "episodes.jsonl").read_text().splitlines()
    assert not {json.loads(x)["scenario"]["context"] for x in episodes} & {s["context"] for s in heldout}


def test_grpo_against_a_worker_without_non_storing_scores_stops_before_collecting(tiny_model, tmp_path):
    """GRPO's reward is the worker's /api/score; the real worker has none, and would store every sampled answer."""
    worker_db = tmp_path / "worker.db"
    with start_worker(worker_db, "--strict-contract") as url:
        env = settings(tmp_path, tiny_model, WORKER_URL=url, BACKEND="echo", METHOD="grpo")
        result = pipeline(env, timeout=60)
        stored = sqlite3.connect(worker_db).execute("SELECT COUNT(*) FROM experiences").fetchone()[0]
    assert result.returncode == 1
    assert "METHOD=grpo scores every sampled answer through the worker's /api/score" in result.stderr
    assert stored == 0 and not (tmp_path / "out" / "iter-1" / "episodes.jsonl").exists()


def offline_selection() -> dict:
    text = SCRIPT.read_text()
    return dict(pair.split("=") for pair in text.split("readonly OFFLINE_SELECTION=(")[1].split(")")[0].split())


def test_the_offline_selection_is_the_demos():
    demo = subprocess.run(["make", "-s", "demo-settings"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    demo_settings = dict(pair.split("=") for pair in demo)
    assert offline_selection() == {k: demo_settings[k] for k in offline_selection()}


def test_with_no_model_and_no_threshold_the_offline_run_takes_the_demos_selection(tmp_path):
    """SmolLM2's answers rarely reach 6.5 / good: a new user's first run must not stop at 'nothing passed'."""
    env = settings(tmp_path, Path("unused"), BACKEND="echo", SKIP_TRAIN="1")
    for name in ("MODEL", "FORMAT", "MAX_HARM", "MIN_BUDDHIST", "MIN_ALIGNMENT"):
        env.pop(name)
    result = pipeline(env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no threshold set: using the offline model's measured selection" in result.stderr
    convert = next(line for line in result.stderr.splitlines() if "] convert: " in line)
    for flag, value in offline_selection().items():
        if flag != "TRIM_UNFINISHED":
            assert f"--{flag.lower().replace('_', '-')} {value}" in convert, (flag, convert)
    assert "--trim-unfinished" in convert

    chosen = pipeline({**env, "OUTPUT_DIR": str(tmp_path / "o2"), "MIN_BUDDHIST": "0"}, timeout=120)
    assert "measured selection" not in chosen.stderr and "--min-buddhist 0" in chosen.stderr
