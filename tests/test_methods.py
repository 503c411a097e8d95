"""train_local.py --method dpo|grpo, run as a user runs it: a tiny Llama built here, the converter's pairs, and
a real local worker on loopback (or, for failures, a small HTTP server that fails the way workers do)."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import saige_db
from conftest import ROOT, run, start_worker

SCRIPT = "train_local.py"
BANK = json.loads((ROOT / "data" / "scenarios.json").read_text())
GOOD, BAD = 9.0, 3.0


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """The converter's --dpo-output pairs (ChatML) from a database where each scenario has a good and a bad answer."""
    folder = tmp_path_factory.mktemp("pairs")
    conn = saige_db.create(folder / "saige.db")
    with conn:
        for s in BANK[:16]:
            sid = saige_db.add_scenario(conn, s["context"], s["person_state"], s["facts"], s["critical_info"], 1)
            saige_db.add_experience(conn, sid, s["expected_response"], 0.05, dict.fromkeys(saige_db.WEIGHTS, GOOD))
            saige_db.add_experience(conn, sid, "No. Figure it out.", 0.6, dict.fromkeys(saige_db.WEIGHTS, BAD))
    conn.close()
    out = folder / "pairs.jsonl"
    result = run(
        "saige_to_sft.py", "--db", folder / "saige.db", "-o", folder / "sft.csv", "--format", "chatml",
        "--dpo-output", out, "-q",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(out.read_text().splitlines()) == 16
    return out


def train(model: Path, out: Path, *args, timeout: float = 300):
    return run(SCRIPT, "--model", model, "--output-dir", out, "--batch-size", "4", "-q", *args, timeout=timeout)


def answer_logprob(model, tokenizer, prompt: str, answer: str) -> float:
    """log p(answer | prompt), summed over the answer's tokens."""
    import torch

    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + answer)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    logps = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(logps[len(prompt_ids) - 1 :].sum())


def mean_margin(model, tokenizer, rows: list[dict]) -> float:
    margins = [
        answer_logprob(model, tokenizer, r["prompt"], r["chosen"])
        - answer_logprob(model, tokenizer, r["prompt"], r["rejected"])
        for r in rows
    ]
    return sum(margins) / len(margins)


def test_dpo_writes_a_loadable_adapter_and_the_margin_grows(tiny_model, pairs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "dpo"
    result = train(tiny_model, out, "--method", "dpo", "--data", pairs, "--max-steps", "12", "--learning-rate", "5e-3",
                   "--logging-steps", "1", "--eval-split", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "saige_data.meta.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["method"] == "dpo" and summary["train_rows"] == 16 and summary["steps"] == 12
    curve = summary["margin_history"]
    assert len(curve) == 12 and curve[-1]["margin"] > curve[0]["margin"]
    assert "margin" in result.stderr.splitlines()[-1]  # the done line reports the margin

    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = mean_margin(base, tokenizer, rows)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    after = mean_margin(tuned, tokenizer, rows)
    assert after > before + 1.0, (before, after)


def test_dpo_data_without_pair_columns_names_them_and_the_converter_flag(tiny_model, pairs, tmp_path):
    result = train(tiny_model, tmp_path / "o", "--method", "dpo", "--data", pairs.parent / "sft.csv")
    assert result.returncode == 1
    assert "DPO needs: prompt, chosen, rejected" in result.stderr and "--dpo-output" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # a whole training run or pipeline: `make test-slow` (CI runs both)
def test_dpo_skips_and_counts_pairs_whose_chosen_equals_rejected(tiny_model, pairs, tmp_path):
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    rows[0]["rejected"] = rows[0]["chosen"]
    rows[1]["rejected"] = rows[1]["chosen"] + "  "
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = train(tiny_model, tmp_path / "o", "--method", "dpo", "--data", data, "--max-steps", "1")
    assert result.returncode == 0, result.stderr
    assert "skipped 2 of 16 pairs whose chosen answer equals the rejected one" in result.stderr
    summary = json.loads((tmp_path / "o" / "training_summary.json").read_text())
    assert summary["skipped_equal_pairs"] == 2 and summary["train_rows"] + summary["eval_rows"] == 14

    data.write_text("".join(json.dumps({**r, "rejected": r["chosen"]}) + "\n" for r in rows))
    result = train(tiny_model, tmp_path / "o2", "--method", "dpo", "--data", data, "--max-steps", "1")
    assert result.returncode == 1 and "no usable preference pair" in result.stderr


def test_grpo_learns_from_a_real_local_worker_and_stores_nothing(tiny_model, tmp_path):
    import sqlite3

    db = tmp_path / "saige.db"
    with start_worker(db) as url:
        out = tmp_path / "grpo"
        result = train(tiny_model, out, "--method", "grpo", "--worker-url", url, "--max-steps", "3",
                       "--max-completion-length", "12", "--logging-steps", "1")  # fmt: skip
        assert result.returncode == 0, result.stderr
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["method"] == "grpo" and summary["steps"] == 3
    assert summary["train_rows"] == 75  # the bank's train split; the 25 held-out scenarios are never prompts
    assert summary["scoring_calls"] >= 3 * 4 - 4  # 4 answers a step (empty answers are not sent)
    curve = summary["reward_history"]
    assert len(curve) == 3 and all({"reward", "weighted", "harm", "words", "distinct2"} <= set(c) for c in curve)
    assert summary["sample_answers"] and "reward" in summary["sample_answers"][0]
    assert (out / "adapter_model.safetensors").is_file()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM experiences").fetchone()[0] == 0


@pytest.mark.slow  # a whole training run or pipeline: `make test-slow` (CI runs both)
def test_grpo_takes_prompts_from_converter_output_and_leaves_out_heldout(tiny_model, tmp_path):
    heldout = [i + 1 for i, s in enumerate(BANK) if s.get("split") == "heldout"][:2]
    train_ids = [i + 1 for i, s in enumerate(BANK) if s.get("split") != "heldout"][:3]
    rows = [{"prompt": f"<|im_start|>user\nHi {i}<|im_end|>\n<|im_start|>assistant\n", "completion": "Hello",
             "scenario_id": i} for i in train_ids + heldout + train_ids[:1]]  # fmt: skip
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with start_worker(tmp_path / "saige.db") as url:
        result = train(tiny_model, tmp_path / "o", "--method", "grpo", "--worker-url", url, "--data", data,
                       "--max-steps", "1", "--max-completion-length", "8")  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "o" / "training_summary.json").read_text())
    assert summary["train_rows"] == 3  # one prompt per training scenario; held-out ones dropped
    assert "left out 2 rows of held-out scenarios" in result.stderr


class FailingWorker(BaseHTTPRequestHandler):
    """A worker whose scorer fails after `ok_scores` answers (or has no /api/score at all)."""

    ok_scores, has_score_endpoint, score_requests = 4, True, 0

    def do_GET(self):
        if self.path.startswith("/api/scenarios"):
            split = "heldout" if "heldout" in self.path else "train"
            scenarios = [] if split == "heldout" else [{"id": i, "context": c} for i, c in ((1, "Hi"), (2, "Hello"))]
            return self.reply(200, {"split": split, "scenarios": scenarios})
        return self.reply(200, {"stats": {}})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not self.has_score_endpoint:
            return self.reply(404, {"error": "Not found"})
        type(self).score_requests += 1
        if self.score_requests > self.ok_scores:
            return self.reply(500, {"error": "scorer crashed"})
        return self.reply(200, {"total_harm": 0.1, "buddhist_assessment": {"weighted_score": 6.0}})

    def reply(self, status: int, payload: dict):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextmanager
def failing_worker(**attrs):
    handler = type("Handler", (FailingWorker,), dict(attrs, score_requests=0))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()


@pytest.mark.slow  # a whole training run or pipeline: `make test-slow` (CI runs both)
def test_grpo_stops_clearly_with_a_checkpoint_when_the_worker_fails_mid_run(tiny_model, tmp_path):
    # the probe and the first step's 4 answers succeed; every later score is a 500
    with failing_worker(ok_scores=5) as (url, handler):
        result = train(tiny_model, tmp_path / "o", "--method", "grpo", "--worker-url", url, "--max-steps", "5",
                       "--max-completion-length", "8", "--worker-retries", "2", "--temperature", "1.0")  # fmt: skip
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "failed to score an answer" in last and "checkpoint" in last and "--resume" in last
    assert "Traceback" not in result.stderr
    checkpoints = list((tmp_path / "o").glob("checkpoint-*"))
    assert checkpoints and (checkpoints[0] / "adapter_model.safetensors").is_file()
    assert handler.score_requests >= 5 + 3  # a failing answer is tried 1 + 2 times before giving up


def test_grpo_refuses_a_worker_that_can_only_score_by_storing(tiny_model, tmp_path):
    with failing_worker(has_score_endpoint=False) as (url, _):
        result = train(tiny_model, tmp_path / "o", "--method", "grpo", "--worker-url", url)
    assert result.returncode == 2
    assert "no non-storing scoring endpoint" in result.stderr and "--allow-storing-rewards" in result.stderr


def test_grpo_sends_the_worker_token_when_it_probes_the_worker(tiny_model, tmp_path):
    """The probe once went without the token, so a worker started with --token looked unreachable (exit 3)."""
    with start_worker(tmp_path / "w.db", "--token", "s3cret", "--strict-contract") as url:
        base = ("--method", "grpo", "--worker-url", url)
        right = train(tiny_model, tmp_path / "o", *base, "--worker-token", "s3cret")
        wrong = train(tiny_model, tmp_path / "o", *base, "--worker-token", "nope")
    # with the token the probe gets through, and finds a worker that can only score by storing
    assert right.returncode == 2 and "no non-storing scoring endpoint" in right.stderr
    assert (
        wrong.returncode == 3 and "refused the request (HTTP 401)" in wrong.stderr and "--worker-token" in wrong.stderr
    )
    assert len(wrong.stderr.strip().splitlines()) == 1


def test_grpo_with_the_worker_unreachable_exits_3_in_one_line(tiny_model, tmp_path):
    result = train(tiny_model, tmp_path / "o", "--method", "grpo", "--worker-url", "http://127.0.0.1:9")
    assert result.returncode == 3
    assert result.stderr.startswith("train_local.py: error: cannot reach the SAIGE worker at http://127.0.0.1:9")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "ppo", "--data", "x.csv"], "invalid choice: 'ppo'"),
        (["--method", "dpo"], "--method dpo needs --data"),
        (["--method", "grpo", "--num-generations", "3"], "must be a multiple of --num-generations"),
        (["--method", "grpo", "--num-generations", "1"], "at least 2"),
    ],
)
def test_usage_errors_exit_2(tiny_model, tmp_path, args, message):
    result = train(tiny_model, tmp_path / "o", *args)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.slow  # a whole training run or pipeline: `make test-slow` (CI runs both)
def test_max_minutes_stops_after_the_step_that_passes_the_budget(tiny_model, pairs, tmp_path):
    out = tmp_path / "o"
    result = train(tiny_model, out, "--method", "dpo", "--data", pairs, "--max-steps", "50", "--max-minutes", "0.0001")
    assert result.returncode == 0, result.stderr
    assert "--max-minutes 0.0001 reached at step 1" in result.stderr
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 1
    assert (out / "adapter_model.safetensors").is_file()


def test_grpo_prompts_are_the_converters_and_evaluators_copy():
    import inspect
    import sys

    sys.path.insert(0, str(ROOT))
    import saige_to_sft
    import train_local

    assert train_local.DEFAULT_SYSTEM_PROMPT == saige_to_sft.DEFAULT_SYSTEM_PROMPT
    assert inspect.getsource(train_local.user_turn) == inspect.getsource(saige_to_sft.user_turn)  # byte-identical
