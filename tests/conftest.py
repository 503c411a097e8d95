"""Shared fixtures: run the scripts as a user would, on databases built in the test's own folder."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/saige_db.py, the fixture builder

import saige_db  # noqa: E402


def run(script: str, *args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run a top-level script in a subprocess, the way a user runs it."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """An empty database with the contract's schema; tests add the rows they need."""
    path = tmp_path / "saige.db"
    saige_db.create(path).close()
    return path


@pytest.fixture
def demo_db(tmp_path: Path) -> Path:
    """The realistic, messy demo database (both timestamp formats, orphans, NULL and broken JSON)."""
    path = tmp_path / "demo.db"
    saige_db.build_demo(path)
    return path


@contextlib.contextmanager
def start_worker(db: Path, *args: str):
    """A real saige_worker.py on a free loopback port (created with --init); yields its URL, stops it after."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "saige_worker.py"), "--db", str(db), "--init", "--port", "0", "--quiet", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        match = re.search(r"http://[\d.]+:\d+", line)
        assert match, f"the worker did not start: {line!r}"
        yield match.group(0)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def worker_url(tmp_path_factory):
    """One local worker with the bundled scenario bank, shared by the tests that only score."""
    with start_worker(tmp_path_factory.mktemp("worker") / "saige.db") as url:
        yield url


SPECIALS = [
    "<s>",
    "</s>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "[INST]",
    "[/INST]",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer that knows every chat format's special tokens."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    corpus = [
        s["context"] + " " + s["expected_response"] for s in json.loads((ROOT / "data" / "scenarios.json").read_text())
    ]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=1000, min_frequency=2, special_tokens=SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


# --- the bad-input matrices (tests/test_*_safety.py) -------------------------------------------------------
# Fuzz tests run a fixed number of examples from a fixed seed in CI; `make fuzz` raises the budget.
FUZZ_EXAMPLES = int(os.environ.get("SAIGE_FUZZ_EXAMPLES", "40"))


def cpu_computes_bf16() -> bool:
    """This CPU's own answer (torch's flags), so a test expects what `--precision auto` should pick here."""
    import torch

    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def snapshot(*paths: Path) -> dict:
    """Each path's bytes (None when absent), to prove a failed run left every file as it was."""
    return {Path(p): (Path(p).read_bytes() if Path(p).is_file() else None) for p in paths}


def assert_refused(result: subprocess.CompletedProcess, code: int, pattern: str, unchanged: dict | None = None):
    """A clean refusal: the exit code, no traceback, a stderr line matching `pattern`, every file unchanged."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, f"exit {result.returncode}, expected {code}:\n{result.stderr}"
    assert re.search(pattern, result.stderr, re.I | re.M), f"{pattern!r} not in:\n{result.stderr}"
    for path, before in (unchanged or {}).items():
        after = path.read_bytes() if path.is_file() else None
        assert after == before, f"{path} changed"
