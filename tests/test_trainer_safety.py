"""train_local.py's safety: no run overwrites or deletes an input, bad values and files are refused in one line
before a model loads, a misbehaving worker's replies never reach the GRPO loss, Ctrl-C exits 130."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, assert_refused, run, snapshot, start_worker
from fault_worker import FaultProxy, serve

SCRIPT = "train_local.py"
CHATML = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
FAST_S = 5  # a refusal before any heavy import answers in well under a second; loading torch takes longer


def write_data(path: Path) -> Path:
    """A small converter-style CSV (ChatML text, scenario ids) and its sidecar."""
    rows = ["text,scenario_id"]
    for i in range(1, 9):
        text = CHATML.format(q=f"I feel lost, day {i}.", a="I hear you. Let us take one small step together.")
        rows.append('"' + text.replace('"', '""') + f'",{i}')
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    Path(f"{path}.meta.json").write_text(json.dumps({"format": "chatml", "prompt_template": ""}))
    return path


class Case:
    """The files of one matrix row, all in the test's own folder."""

    def __init__(self, tmp: Path, model: Path):
        self.tmp, self.model = tmp, model
        self.data = write_data(tmp / "train.csv")
        self.sidecar = Path(f"{self.data}.meta.json")
        self.out = tmp / "out"
        self.done = tmp / "done"  # a finished adapter from an earlier run
        self.done.mkdir()
        for name in ("adapter_model.safetensors", "adapter_config.json", "training_summary.json"):
            (self.done / name).write_bytes(b"earlier run: " + name.encode())

    def file(self, name: str, content: bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return path

    def copy_data(self, relative: str) -> Path:
        return self.file(relative, self.data.read_bytes())

    def guarded(self) -> list[Path]:
        return [self.data, self.sidecar, *sorted(self.done.iterdir()), self.model / "config.json"]


def hard_linked(c: Case) -> list:
    c.out.mkdir()
    os.link(c.data, c.out / "training_summary.json")
    return ["--output-dir", c.out]


def fake_model_dir(c: Case) -> list:
    (c.tmp / "weights").mkdir()
    (c.tmp / "weights" / "model.safetensors").write_bytes(b"x")
    return ["--model", c.tmp / "weights"]


# (id, args built from the Case, exit code, stderr pattern, fast: refused before any heavy import)
MATRIX = [
    # no output ever overwrites or deletes an input
    ("out-is-data", lambda c: ["--output-dir", c.data], 2, r"--output-dir .*train\.csv is the same file as --data"),
    ("out-is-sidecar", lambda c: ["--output-dir", c.sidecar], 2, r"same file as --data's sidecar"),
    ("out-is-model-dir", lambda c: ["--output-dir", c.model], 2, r"holds the base model"),
    ("out-holds-model", lambda c: ["--output-dir", c.model.parent], 2, r"holds the base model"),
    (
        "data-named-like-summary",
        lambda c: ["--output-dir", c.out, "--data", c.copy_data("out/training_summary.json")],
        2,
        r"would write training_summary\.json over --data",
    ),
    (
        "data-named-like-adapter-config",
        lambda c: ["--output-dir", c.out, "--data", c.copy_data("out/adapter_config.json"), "--overwrite"],
        2,
        r"would write adapter_config\.json over --data",
    ),
    ("hard-link-into-out", hard_linked, 2, r"would write training_summary\.json over --data"),
    (
        "data-in-checkpoint-overwrite",
        lambda c: ["--output-dir", c.done, "--overwrite", "--data", c.copy_data("done/checkpoint-2/train.csv")],
        2,
        r"lies inside .*checkpoint-2, which this run writes over or deletes",
    ),
    (
        "data-in-merged",
        lambda c: ["--output-dir", c.done, "--overwrite", "--merge", "--data", c.copy_data("done/merged/t.csv")],
        2,
        r"lies inside .*merged",
    ),
    ("out-is-a-file", lambda c: ["--output-dir", c.file("notes.txt", b"keep me")], 2, r"is an existing file"),
    ("out-under-a-file", lambda c: ["--output-dir", c.file("notes.txt", b"keep") / "adapter"], 2, r"is a file, not"),
    ("finished-adapter", lambda c: ["--output-dir", c.done], 1, r"already holds a finished adapter.*--overwrite"),
    # numbers: ranges, NaN, absurd integers
    ("epochs-zero", lambda c: ["--epochs", "0"], 2, r"argument --epochs: must be a finite number in \(0"),
    ("epochs-negative", lambda c: ["--epochs", "-1"], 2, r"argument --epochs"),
    ("epochs-nan", lambda c: ["--epochs", "nan"], 2, r"argument --epochs"),
    ("lr-zero", lambda c: ["--learning-rate", "0"], 2, r"argument --learning-rate"),
    ("lr-inf", lambda c: ["--learning-rate", "inf"], 2, r"argument --learning-rate"),
    ("rank-absurd", lambda c: ["--lora-rank", str(10**30)], 2, r"argument --lora-rank: must be at most"),
    ("batch-zero", lambda c: ["--batch-size", "0"], 2, r"argument --batch-size: must be a positive integer"),
    ("max-steps-zero", lambda c: ["--max-steps", "0"], 2, r"argument --max-steps"),
    ("max-minutes-zero", lambda c: ["--max-minutes", "0"], 2, r"argument --max-minutes"),
    ("warmup-above-1", lambda c: ["--warmup-ratio", "1.5"], 2, r"argument --warmup-ratio"),
    ("max-length-absurd", lambda c: ["--max-length", str(10**30)], 2, r"argument --max-length: must be at most"),
    ("seed-negative", lambda c: ["--seed", "-1"], 2, r"argument --seed: must be at least 0"),
    ("dropout-one", lambda c: ["--lora-dropout", "1"], 2, r"argument --lora-dropout"),
    ("generations-absurd", lambda c: ["--method", "grpo", "--num-generations", str(10**30)], 2, r"must be at most"),
    ("temperature-zero", lambda c: ["--method", "grpo", "--temperature", "0"], 2, r"argument --temperature"),
    ("retries-negative", lambda c: ["--method", "grpo", "--worker-retries", "-1"], 2, r"argument --worker-retries"),
    # data files
    ("data-missing", lambda c: ["--data", c.tmp / "nope.csv"], 1, r"data file not found: .*nope\.csv"),
    ("data-folder", lambda c: ["--data", c.tmp], 1, r"--data .* is a folder; pass the converter's CSV"),
    ("data-empty", lambda c: ["--data", c.file("e.csv", b"")], 1, r"e\.csv has no rows"),
    ("data-not-csv", lambda c: ["--data", c.file("t.txt", b"text\nhi\n")], 1, r"t\.txt is not a \.csv or \.jsonl"),
    ("csv-no-text", lambda c: ["--data", c.file("q.csv", b"question,answer\nhi,yo\n")], 1, r"no 'text', 'messages'"),
    ("csv-bad-utf8", lambda c: ["--data", c.file("u.csv", b"text\n\xff\xfe caf\xe9\n")], 1, r"not UTF-8 .*offset 5"),
    ("csv-binary", lambda c: ["--data", c.file("b.csv", b"text\n\x00\x01\x02")], 1, r"is a binary file"),
    ("jsonl-not-json", lambda c: ["--data", c.file("j.jsonl", b"text: hi\n")], 1, r"is not JSON Lines"),
    (
        "data-is-sqlite",
        lambda c: ["--data", c.file("saige.db", b"SQLite format 3\x00" + bytes(100))],
        1,
        r"is a SQLite database; convert it first: saige_to_sft\.py",
    ),
    ("dpo-csv-no-pairs", lambda c: ["--method", "dpo"], 1, r"lacks the column\(s\) DPO needs"),
    # model and checkpoint paths
    ("model-missing-dir", lambda c: ["--model", c.tmp / "no-model"], 1, r"model folder not found"),
    ("model-missing-gguf", lambda c: ["--model", c.tmp / "m.gguf"], 1, r"model file not found"),
    ("model-no-config", fake_model_dir, 1, r"folder without config\.json"),
    ("model-fake-gguf", lambda c: ["--model", c.file("m.gguf", b"<html>404</html>")], 1, r"is not a GGUF file"),
    ("model-not-gguf-file", lambda c: ["--model", c.file("m.bin", b"x")], 1, r"not a \.gguf model"),
    ("resume-nothing", lambda c: ["--resume"], 1, r"--resume: no checkpoint-\* folder"),
    ("resume-missing", lambda c: ["--resume", c.tmp / "checkpoint-9"], 1, r"no such checkpoint folder"),
    (
        "suite-bad-utf8",
        lambda c: ["--method", "grpo", "--suite", c.file("s.jsonl", b'{"context": "\xff"}\n')],
        1,
        r"suite file .* is not UTF-8",
    ),
]


@pytest.mark.parametrize("make_args, code, pattern", [pytest.param(*row[1:], id=row[0]) for row in MATRIX])
def test_bad_input_matrix(tiny_model, tmp_path, make_args, code, pattern):
    case = Case(tmp_path, tiny_model)
    row = make_args(case)
    args = ["--model", tiny_model, "--output-dir", case.out, "-q", *row]
    if "--data" not in row and "--suite" not in row:
        args = ["--data", case.data, *args]
    before, out_existed = snapshot(*case.guarded()), case.out.exists()
    started = time.monotonic()
    result = run(SCRIPT, *args, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    elapsed = time.monotonic() - started
    assert_refused(result, code, pattern, unchanged=before)
    assert "no GPU found" not in result.stderr and "using the offline model" not in result.stderr
    assert elapsed < FAST_S, f"refused after {elapsed:.1f}s: something heavy ran first"
    assert case.out.exists() == out_existed  # a refused run creates no folder


def test_ctrl_c_while_loading_exits_130_in_one_line(tiny_model, tmp_path):
    case = Case(tmp_path, tiny_model)
    cmd = [sys.executable, str(ROOT / SCRIPT), "--data", str(case.data), "--model", str(tiny_model)]
    proc = subprocess.Popen([*cmd, "--output-dir", str(case.out), "-q"], stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # the arguments are checked; torch, datasets or the model are loading
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "train_local.py: interrupted"
    assert not (case.out / "adapter_model.safetensors").exists()


# --- GRPO against a misbehaving worker ---------------------------------------------------------------------
def grpo(model: Path, url: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    return run(SCRIPT, "--method", "grpo", "--model", model, "--worker-url", url, "--output-dir", out,
               "--num-generations", "4", "--max-completion-length", "8", "--logging-steps", "1",
               "--worker-retries", "3", "--temperature", "1.0", "-q", *args, timeout=300)  # fmt: skip


BAD_REPLIES = ["nan", "infinity", "string-scores", "not-object", "html", "truncate", "malformed", "harm-nan"]


def test_grpo_turns_unusable_worker_replies_into_failed_rewards(tiny_model, tmp_path):
    """Every bad reply costs one answer its learning signal, counted with its reason; 5xx bursts are retried;
    no NaN reaches the loss, and the run finishes."""
    # the probe, then one step of 12 answers (3 prompts x 4): 8 bad replies, 4 good, a 5xx burst retried between
    queue = ["ok", *BAD_REPLIES[:4], "503", "500", "502", "ok", "ok", *BAD_REPLIES[4:], "ok", "ok"]
    db = tmp_path / "saige.db"
    with start_worker(db) as upstream, serve(FaultProxy(upstream, post=queue)) as url:
        result = grpo(tiny_model, url, tmp_path / "o", "--max-steps", "1", "--batch-size", "12")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads((tmp_path / "o" / "training_summary.json").read_text())
    assert summary["steps"] == 1 and summary["reward_history"]
    # an answer the tiny model leaves empty is not sent, which shifts the queue by one
    assert len(BAD_REPLIES) - 1 <= summary["failed_scores"] <= len(BAD_REPLIES), summary["failed_score_reasons"]
    reasons = set(summary["failed_score_reasons"])
    assert {"weighted_score is not finite", "weighted_score is not a number", "reply is not a JSON object"} <= reasons
    assert {"reply is not JSON", "reply cut short", "total_harm is not finite"} & reasons
    assert all(math.isfinite(step[k]) for step in summary["reward_history"] for k in step), summary["reward_history"]
    assert "NaN" not in (tmp_path / "o" / "training_summary.json").read_text()
    assert "got no usable score from the worker" in result.stderr
    with sqlite3.connect(db) as conn:  # the non-storing scorer, retried or not, stored nothing
        assert conn.execute("SELECT COUNT(*) FROM experiences").fetchone()[0] == 0


def test_grpo_stops_with_a_checkpoint_when_no_answer_of_a_step_can_be_scored(tiny_model, tmp_path, worker_url):
    with serve(FaultProxy(worker_url, post=["ok", "nan", "html", "not-object", "string-scores"])) as url:
        result = grpo(tiny_model, url, tmp_path / "o", "--max-steps", "1", "--batch-size", "4")
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "gave no usable score for any answer of this step" in last and "--resume" in last
    assert "Traceback" not in result.stderr and list((tmp_path / "o").glob("checkpoint-*"))
