"""train_pipeline.sh refuses bad settings in one line before any step runs, and never lets a step write over the
database (OUTPUT_DIR is never DB_PATH nor a folder around it that a step writes into)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, snapshot

SCRIPT = ROOT / "train_pipeline.sh"


def settings(tmp: Path, **extra: str) -> dict:
    """Settings that would start real work (a worker, a collection): a refusal must come before any of it."""
    return {
        **os.environ,
        "PYTHON": sys.executable,
        "DB_PATH": str(tmp / "saige.db"),
        "OUTPUT_DIR": str(tmp / "out"),
        "WORKER_URL": "http://127.0.0.1:9",
        "MODEL": str(tmp / "model"),
        **extra,
    }


BAD = [
    ("epochs-negative", {"EPOCHS": "-1"}, r"EPOCHS=-1: must be a number above 0"),
    ("epochs-word", {"EPOCHS": "two"}, r"EPOCHS=two: must be a number"),
    ("lr-zero", {"LEARNING_RATE": "0"}, r"LEARNING_RATE=0: must be a number above 0"),
    ("train-minutes-zero", {"TRAIN_MINUTES": "0"}, r"TRAIN_MINUTES=0: must be a number above 0"),
    ("iterations-absurd", {"ITERATIONS": str(10**30)}, r"ITERATIONS=1000+: must be a positive integer"),
    ("rank-absurd", {"LORA_RANK": "4096"}, r"LORA_RANK=4096: must be at most 1024"),
    ("seed-too-big", {"SEED": str(2**40)}, r"SEED=\d+: an integer from 0 to 4294967295"),
    ("eval-temperature-nan", {"EVAL_TEMPERATURE": "nan"}, r"EVAL_TEMPERATURE=nan: must be a number"),
    ("max-harm-above-1", {"MAX_HARM": "1.5"}, r"MAX_HARM=1.5: a number from 0 to 1"),
    ("model-missing", {"MODEL": "./no-such-model"}, r"MODEL=./no-such-model: no such file or folder"),
    ("out-is-db", {"OUTPUT_DIR": "{db}"}, r"OUTPUT_DIR=.* is the database DB_PATH"),
    ("db-in-iter", {"DB_PATH": "{tmp}/out/iter-1/saige.db"}, r"lies in .*iter-1, which the pipeline writes"),
    ("db-is-summary", {"DB_PATH": "{tmp}/out/summary.txt"}, r"lies in .*summary\.txt, which the pipeline writes"),
    ("db-is-folder", {"DB_PATH": "{tmp}"}, r"DB_PATH=.* is a folder"),
    ("train-config-missing", {"TRAIN_CONFIG": "{tmp}/none.yaml"}, r"none\.yaml: not a usable recipe: cannot read"),
    ("train-config-typo", {"TRAIN_CONFIG": "{tmp}/typo.yaml"}, r"recipe: unrecognized arguments: --epoch \(not a"),
    ("out-under-a-file", {"OUTPUT_DIR": "{db}/out"}, r"cannot be made: .*saige\.db is a file"),
    ("server-unknown", {"BACKEND": "openai", "SERVER": "vllm"}, r"SERVER=vllm: use llama\.cpp, or leave it empty"),
    ("server-needs-openai", {"SERVER": "llama.cpp"}, r"SERVER=llama\.cpp needs BACKEND=openai"),
    ("server-needs-gguf", {"BACKEND": "openai", "SERVER": "llama.cpp"}, r"MODEL=.*model is not a \.gguf"),
    (
        "server-port",
        {"BACKEND": "openai", "SERVER": "llama.cpp", "MODEL": "{tmp}/m.gguf", "LLAMACPP_PORT": "70000"},
        r"LLAMACPP_PORT=70000: a port number from 1 to 65535",
    ),
]


@pytest.mark.parametrize("extra, pattern", [pytest.param(*row[1:], id=row[0]) for row in BAD])
def test_bad_settings_fail_at_once(tmp_path, extra, pattern):
    (tmp_path / "model").mkdir()
    (tmp_path / "typo.yaml").write_text("epoch: 3\n")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    db = tmp_path / "saige.db"
    db.write_bytes(b"SQLite format 3\x00 the user's experiences")
    for relative in ("out/iter-1/saige.db", "out/summary.txt"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"precious")
    values = {k: v.format(db=db, tmp=tmp_path) for k, v in extra.items()}
    before = snapshot(db, tmp_path / "out/iter-1/saige.db", tmp_path / "out/summary.txt")
    started = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT)], env=settings(tmp_path, **values), capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_pipeline.sh: error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert time.monotonic() - started < 10  # no worker was started, nothing was collected
    assert snapshot(*before) == before
    assert not (tmp_path / "out" / "worker.log").exists()


def test_a_launcher_that_is_not_a_command_is_refused_before_collecting(tmp_path):
    (tmp_path / "model").mkdir()
    env = settings(tmp_path, LAUNCHER="no-such-launcher launch --num_processes 2")
    started = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr  # like every other bad setting
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("train_pipeline.sh: error: LAUNCHER=no-such-launcher launch --num_processes 2: ")
    assert "no-such-launcher is not a command on PATH" in lines[0]
    assert time.monotonic() - started < 10 and not (tmp_path / "out").exists()  # nothing started, nothing written
