"""saige_to_sft.py, run as a user runs it, on databases built by tests/saige_db.py."""

from __future__ import annotations

import csv
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import saige_db
from conftest import ROOT, run, start_worker

sys.path.insert(0, str(ROOT))
from saige_to_sft import DEFAULT_SYSTEM_PROMPT as SYS  # noqa: E402 - a constant, to spell expected texts

SCRIPT = "saige_to_sft.py"


def scores(x: float) -> dict:
    return dict.fromkeys(saige_db.WEIGHTS, x)


@pytest.fixture
def graded_db(db_path: Path) -> Path:
    """Rows whose fate under each threshold set is known, including every boundary and messy case."""
    conn = sqlite3.connect(db_path)
    with conn:
        hello = saige_db.add_scenario(conn, "Hello!", {"vulnerability": "low", "mood": "neutral"}, difficulty=1)
        pill = saige_db.add_scenario(
            conn, "I think I took my pill twice.", {"vulnerability": "medium", "mood": "anxious"}, difficulty=3
        )
        add = saige_db.add_experience
        add(conn, hello, "Hi! Nice to meet you.", 0.0, scores(9), timestamp="2026-01-10T10:00:00.000Z")  # 1
        add(conn, hello, "Hello.", 0.3, scores(6), timestamp="2026-01-11T10:00:00.000Z")  # 2: both boundaries
        add(conn, pill, "Call your pharmacist.", 0.31, scores(9), timestamp="2026-01-12T10:00:00.000Z")  # 3
        add(conn, pill, "Maybe rest.", 0.1, scores(5.9), timestamp="2026-01-04T10:00:00.000Z")  # 4: moderate
        add(conn, pill, "Rest a bit.", 0.1, scores(6), "moderate", timestamp="2026-01-05T10:00:00.000Z")  # 5
        add(conn, pill, "Relax.", 0.1, scores(5.99), "good", timestamp="2026-01-06T10:00:00.000Z")  # 6
        add(conn, hello, "Good day to you!", 0.0, scores(8), timestamp="2025-12-01 09:00:00")  # 7: old format
        add(conn, pill, "Please phone a pharmacist now.", 0.0, scores(7), timestamp="2026-02-01 08:00:00")  # 8
        add(conn, 999, "Orphan answer.", 0.0, scores(9))  # 9
        add(conn, hello, "Broken scores.", 0.0, raw_scores='{"ahimsa": 9,')  # 10
        add(conn, hello, "Null scores.", 0.0, raw_scores=saige_db.NULL)  # 11
        add(conn, pill, "   ", 0.0, scores(9))  # 12: empty
        add(conn, hello, "Assistant: Hello friend!\nUser: thanks\nAI: welcome", 0.2, scores(7))  # 13
        add(conn, pill, "Broken breakdown.", 0.0, scores(9), raw_breakdown="nope")  # 14
        add(
            conn, hello, "Float noise.", (0.1 + 0.2 + 0.3 + 0.6) / 4, scores(7), timestamp="2026-01-01T00:00:00.000Z"
        )  # 15: 0.30000000000000004
    conn.close()
    return db_path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def convert(db: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return run(SCRIPT, "--db", db, "--output", out, *args)


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], [8, 1, 7, 13, 2, 15]),
        (["--max-harm", "0.3", "--min-buddhist", "6.0", "--min-alignment", "good"], [8, 1, 7, 13, 2, 15]),
        (["--max-harm", "0.1"], [8, 1, 7]),
        (["--max-harm", "0"], [8, 1, 7]),
        (["--min-buddhist", "5.9", "--min-alignment", "moderate"], [8, 1, 7, 6, 5, 4, 13, 2, 15]),
        (["--min-alignment", "excellent"], [1, 7]),
        (["--min-buddhist", "9"], [1]),
        (["--limit", "2"], [8, 1]),
        (["--max-difficulty", "1"], [1, 7, 13, 2, 15]),
        (["--since", "2026-01-10"], [8, 1, 13, 2]),
        (["--best-per-scenario", "1"], [8, 1]),
    ],
)
def test_selects_exact_ids_in_contract_order(graded_db, tmp_path, args, expected):
    out = tmp_path / "out.csv"
    result = convert(graded_db, out, *args)
    assert result.returncode == 0, result.stderr
    assert [int(r["experience_id"]) for r in read_csv(out)] == expected


def test_csv_columns_in_documented_order(graded_db, tmp_path):
    out = tmp_path / "out.csv"
    assert convert(graded_db, out).returncode == 0
    header = out.read_text(encoding="utf-8").splitlines()[0]
    assert header == "text,harm_score,buddhist_alignment,weighted_score,difficulty,scenario_id,experience_id"
    row = read_csv(out)[0]
    assert (row["harm_score"], row["buddhist_alignment"], row["weighted_score"]) == ("0.0", "good", "7.0")
    assert (row["difficulty"], row["scenario_id"]) == ("3", "2")


def test_summary_reports_counts_and_statistics(graded_db, tmp_path):
    result = convert(graded_db, tmp_path / "out.csv")
    assert "Found 6 high-quality experiences" in result.stderr
    assert "Wrote 6 rows" in result.stderr
    assert "Harm: avg 0.133, min 0.000, max 0.300" in result.stderr
    assert "Alignment: excellent: 2 (33.3%), good: 4 (66.7%)" in result.stderr
    assert "Difficulty: 1: 5 (83.3%), 3: 1 (16.7%)" in result.stderr
    assert "Skipped rows: 1 scenario row missing, 3 NULL or malformed JSON, 1 empty response" in result.stderr
    assert "Traceback" not in result.stderr


def test_cleanup_strips_role_prefix_and_invented_turns(graded_db, tmp_path):
    out = tmp_path / "out.csv"
    result = convert(graded_db, out, "--format", "mistral")
    row = next(r for r in read_csv(out) if r["experience_id"] == "13")
    assert row["text"] == "<s>[INST] Hello! [/INST] Hello friend!</s>"
    assert "1 answers cleaned" in result.stderr


def test_a_sampled_nul_character_is_dropped_so_the_trainer_reads_the_file(db_path, tmp_path):
    conn = sqlite3.connect(db_path)
    with conn:
        hello = saige_db.add_scenario(conn, "Hello!", {"vulnerability": "low", "mood": "neutral"})
        saige_db.add_experience(conn, hello, "Hi\0 there, friend.", 0.0, scores(9))
    conn.close()
    out = tmp_path / "out.csv"
    assert convert(db_path, out, "--format", "chatml").returncode == 0
    assert b"\0" not in out.read_bytes() and "Hi there, friend.<|im_end|>" in read_csv(out)[0]["text"]


def test_no_clean_keeps_answer_as_stored(graded_db, tmp_path):
    out = tmp_path / "out.csv"
    assert convert(graded_db, out, "--no-clean").returncode == 0
    row = next(r for r in read_csv(out) if r["experience_id"] == "13")
    assert row["text"].endswith("[/INST] Assistant: Hello friend!\nUser: thanks\nAI: welcome</s>")


def test_state_note_added_when_person_is_not_neutral(graded_db, tmp_path):
    out = tmp_path / "out.csv"
    assert convert(graded_db, out, "--format", "mistral").returncode == 0
    assert read_csv(out)[0]["text"] == (
        "<s>[INST] I think I took my pill twice.\n\n[Person's state: mood anxious, vulnerability medium] [/INST] "
        "Please phone a pharmacist now.</s>"
    )


ONE_ROW = {
    "tinyllama": f"<|system|>\n{SYS}</s>\n<|user|>\nHello!</s>\n<|assistant|>\nHi! How can I help?</s>",
    "mistral": "<s>[INST] Hello! [/INST] Hi! How can I help?</s>",
    "llama3": (
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYS}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHi! How can I help?<|eot_id|>"
    ),
    "chatml": (
        f"<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\nHi! How can I help?<|im_end|>\n"
    ),
}


@pytest.fixture
def one_row_db(db_path: Path) -> Path:
    conn = sqlite3.connect(db_path)
    with conn:
        sid = saige_db.add_scenario(conn, "Hello!", expected_response="Hello! Lovely to hear from you.")
        saige_db.add_experience(conn, sid, "Hi! How can I help?", 0.0, scores(9))
    conn.close()
    return db_path


@pytest.mark.parametrize("fmt", sorted(ONE_ROW))
def test_format_is_byte_exact(one_row_db, tmp_path, fmt):
    out = tmp_path / "out.csv"
    assert convert(one_row_db, out, "--format", fmt).returncode == 0
    assert read_csv(out)[0]["text"] == ONE_ROW[fmt]


def test_system_prompt_override(one_row_db, tmp_path):
    out = tmp_path / "out.csv"
    assert convert(one_row_db, out, "--format", "tinyllama", "--system-prompt", "Be {kind}.").returncode == 0
    assert read_csv(out)[0]["text"].startswith("<|system|>\nBe {kind}.</s>\n<|user|>\nHello!</s>")
    assert convert(one_row_db, out, "--format", "mistral", "--system-prompt", "Be kind.").returncode == 0
    assert read_csv(out)[0]["text"] == "<s>[INST] Be kind.\n\nHello! [/INST] Hi! How can I help?</s>"


def test_sidecar_describes_the_data(graded_db, tmp_path):
    out = tmp_path / "out.csv"
    assert convert(graded_db, out, "--format", "llama3").returncode == 0
    meta = json.loads((tmp_path / "out.csv.meta.json").read_text())
    assert meta["format"] == "llama3"
    assert meta["system_prompt"] == SYS
    assert meta["prompt_template"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert meta["response_end"] == "<|eot_id|>"
    assert meta["thresholds"] == {"max_harm": 0.3, "min_buddhist": 6.0, "min_alignment": "good"}
    assert meta["counts"]["written"] == 6
    assert meta["counts"]["removed_orphan"] == 1 and meta["counts"]["removed_malformed"] == 3
    assert meta["source_db"] == str(graded_db.resolve())
    assert meta["source_rows"] == {"experiences": 15, "scenarios": 2}
    assert meta["created_at"]


def test_every_output_loads_with_datasets(graded_db, tmp_path):
    from datasets import load_dataset

    outputs = {
        "csv": (["--output-format", "csv"], "csv", {"text", "harm_score", "experience_id"}),
        "text.jsonl": (["--output-format", "jsonl"], "json", {"text", "weighted_score"}),
        "msg.jsonl": (["--output-format", "jsonl", "--layout", "messages"], "json", {"messages"}),
        "pc.jsonl": (["--output-format", "jsonl", "--layout", "prompt-completion"], "json", {"prompt", "completion"}),
    }
    for name, (args, builder, columns) in outputs.items():
        out = tmp_path / f"out.{name}"
        result = convert(graded_db, out, *args, "--dpo-output", tmp_path / f"dpo.{name}.jsonl", "--dpo-margin", "0")
        assert result.returncode == 0, result.stderr
        data = load_dataset(builder, data_files=str(out), split="train", cache_dir=str(tmp_path / "cache"))
        assert data.num_rows == 6 and columns <= set(data.column_names)
        pairs = load_dataset(
            "json", data_files=str(tmp_path / f"dpo.{name}.jsonl"), split="train", cache_dir=str(tmp_path / "cache")
        )
        assert {"prompt", "chosen", "rejected"} <= set(pairs.column_names)


def test_messages_layout_is_conversational(one_row_db, tmp_path):
    out = tmp_path / "out.jsonl"
    assert convert(one_row_db, out, "--output-format", "jsonl", "--layout", "messages").returncode == 0
    row = json.loads(out.read_text().splitlines()[0])
    assert row["messages"] == [
        {"role": "system", "content": SYS},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi! How can I help?"},
    ]


def test_prompt_completion_splits_at_the_answer(one_row_db, tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["--output-format", "jsonl", "--layout", "prompt-completion", "--format", "chatml"]
    assert convert(one_row_db, out, *args).returncode == 0
    row = json.loads(out.read_text().splitlines()[0])
    assert row["prompt"] + row["completion"] == ONE_ROW["chatml"]
    assert row["completion"] == "Hi! How can I help?<|im_end|>\n"


def test_dpo_pairs_best_against_worst_with_margin(graded_db, tmp_path):
    pairs_path = tmp_path / "pairs.jsonl"
    result = convert(graded_db, tmp_path / "out.csv", "--dpo-output", pairs_path, "--format", "mistral")
    assert result.returncode == 0, result.stderr
    pairs = [json.loads(line) for line in pairs_path.read_text().splitlines()]
    # hello: best is #1 (9.0), worst valid is #2 (6.0); pill: best selected #8 (7.0), worst is #4 (5.9)
    assert [(p["chosen_id"], p["rejected_id"]) for p in pairs] == [(1, 2), (8, 4)]
    assert pairs[0]["prompt"] == "<s>[INST] Hello! [/INST] "
    assert pairs[0]["chosen"] == "Hi! Nice to meet you.</s>" and pairs[0]["rejected"] == "Hello.</s>"
    meta = json.loads((tmp_path / "pairs.jsonl.meta.json").read_text())  # the trainer reads the pairs' sidecar
    assert meta["prompt_template"] == "<s>[INST] {user} [/INST] " and meta["dpo_output"] == str(pairs_path)
    assert convert(graded_db, tmp_path / "o.csv", "--dpo-output", pairs_path, "--dpo-margin", "2").returncode == 0
    assert [json.loads(x)["chosen_id"] for x in pairs_path.read_text().splitlines()] == [1]
    # each: the best against every valid answer at least the margin worse, worst first
    assert convert(graded_db, tmp_path / "o.csv", "--dpo-output", pairs_path, "--dpo-pairs", "each").returncode == 0
    pairs = [json.loads(line) for line in pairs_path.read_text().splitlines()]
    expected = [(1, 2), (1, 15), (1, 13), (1, 7), (8, 4), (8, 6), (8, 5)]
    assert [(p["chosen_id"], p["rejected_id"]) for p in pairs] == expected


def test_dedup_drops_near_identical_answers(db_path, tmp_path):
    conn = sqlite3.connect(db_path)
    with conn:
        sid = saige_db.add_scenario(conn, "Hello!")
        other = saige_db.add_scenario(conn, "Good morning!")
        for text in ["Hi, how are you?", "hi how are you", "AI: Hi,  how are you?!", "Something else."]:
            saige_db.add_experience(conn, sid, text, 0.1, scores(7))
        saige_db.add_experience(conn, other, "Hi, how are you?", 0.1, scores(7))
    conn.close()
    out = tmp_path / "out.csv"
    assert convert(db_path, out, "--dedup").returncode == 0
    assert sorted(int(r["experience_id"]) for r in read_csv(out)) == [3, 4, 5]


def test_include_gold_adds_reference_answers(one_row_db, tmp_path):
    out = tmp_path / "out.csv"
    assert convert(one_row_db, out, "--include-gold", "--format", "mistral").returncode == 0
    rows = read_csv(out)
    assert [r["source"] for r in rows] == ["experience", "gold"]
    assert rows[1]["text"] == "<s>[INST] Hello! [/INST] Hello! Lovely to hear from you.</s>"


def test_include_gold_never_adds_the_local_workers_heldout_answers(tmp_path):
    db = tmp_path / "saige.db"
    with start_worker(db):  # the local worker creates the bank with its held-out split
        pass
    with sqlite3.connect(db) as conn:
        heldout = {r[0] for r in conn.execute("SELECT scenario_id FROM scenario_splits WHERE split = 'heldout'")}
        saige_db.add_experience(conn, min({1, 2, 3} - heldout), "Hello there.", 0.0, scores(9))
    out = tmp_path / "out.csv"
    result = convert(db, out, "--include-gold")
    assert result.returncode == 0, result.stderr
    gold = [r for r in read_csv(out) if r["source"] == "gold"]
    assert len(heldout) == 25 and len(gold) == 75 and not heldout & {int(r["scenario_id"]) for r in gold}


def test_stdout_output(one_row_db):
    result = run(SCRIPT, "--db", one_row_db, "-o", "-", "--output-format", "jsonl", "-q")
    assert result.returncode == 0 and result.stderr == ""
    assert json.loads(result.stdout)["text"] == ONE_ROW["mistral"]


def test_zero_matches_explains_and_writes_nothing(graded_db, tmp_path):
    out = tmp_path / "out.csv"
    result = convert(graded_db, out, "--min-buddhist", "10")
    assert result.returncode == 6
    assert "No experiences found matching criteria" in result.stderr
    assert "15 experiences in" in result.stderr
    assert "7 removed: weighted score below --min-buddhist" in result.stderr
    assert "1 removed: scenario row missing" in result.stderr
    assert "--max-harm" in result.stderr and "collect_experiences.py" in result.stderr
    assert not out.exists() and not (tmp_path / "out.csv.meta.json").exists()
    assert list(tmp_path.iterdir()) == [graded_db]


def test_messy_demo_database_converts(demo_db, tmp_path):
    result = convert(demo_db, tmp_path / "out.csv", "--format", "tinyllama")
    assert result.returncode == 0, result.stderr
    assert "1 scenario row missing, 2 NULL or malformed JSON" in result.stderr


def error_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_missing_database_is_not_created(tmp_path):
    result = run(SCRIPT, "--db", tmp_path / "nope.db", "-o", tmp_path / "out.csv")
    assert result.returncode == 1
    assert error_line(result).startswith("saige_to_sft.py: error: database not found:")
    assert list(tmp_path.iterdir()) == []


def test_file_that_is_not_sqlite(tmp_path):
    bad = tmp_path / "notes.db"
    bad.write_text("this is not a database\n" * 100)
    result = run(SCRIPT, "--db", bad, "-o", tmp_path / "out.csv")
    assert result.returncode == 1
    assert "is not a SQLite database" in error_line(result)


def test_database_without_tables(tmp_path):
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).execute("CREATE TABLE other (x)").connection.close()
    result = run(SCRIPT, "--db", empty, "-o", tmp_path / "out.csv")
    assert result.returncode == 1
    assert "has no 'experiences' table" in error_line(result)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "alpaca"], "invalid choice: 'alpaca'"),
        (["--max-harm", "1.5"], "must be between 0 and 1"),
        (["--max-harm", "-0.1"], "must be between 0 and 1"),
        (["--min-buddhist", "11"], "must be between 0 and 10"),
        (["--min-alignment", "great"], "invalid choice: 'great'"),
        (["--limit", "0"], "must be a positive integer"),
        (["--since", "yesterday"], "must be a date"),
        (["--format", "auto"], "--format auto needs --tokenizer"),
        (["--layout", "messages"], "needs --output-format jsonl"),
        (["--min-difficulty", "4", "--max-difficulty", "2"], "greater than --max-difficulty"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_usage_errors_exit_2(graded_db, tmp_path, args, message):
    result = convert(graded_db, tmp_path / "out.csv", *args)
    assert result.returncode == 2
    assert message in error_line(result)


def test_output_directory_must_exist(graded_db, tmp_path):
    result = convert(graded_db, tmp_path / "missing" / "out.csv")
    assert result.returncode == 1
    assert "output directory does not exist" in error_line(result)


def test_failed_write_leaves_no_partial_file(graded_db, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()  # renaming the finished temp file onto a directory fails after every row is written
    result = convert(graded_db, target)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saige.db", "taken"]
    assert list(target.iterdir()) == []


def test_ctrl_c_mid_write_leaves_nothing(db_path, tmp_path):
    conn = sqlite3.connect(db_path)
    with conn:
        sid = saige_db.add_scenario(conn, "Tell me something.")
        conn.executemany(
            "INSERT INTO experiences (scenario_id, ai_response, actual_harm, harm_breakdown, buddhist_scores,"
            " buddhist_alignment, timestamp) VALUES (?, ?, 0.1, '{}', ?, 'good', '2026-01-01T00:00:00Z')",
            ((sid, f"answer {i} " + "x" * 2000, json.dumps(scores(7))) for i in range(150_000)),
        )
    conn.close()
    out = tmp_path / "out.csv"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / SCRIPT), "--db", db_path, "-o", out], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".out.csv.") for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None, "the temp file never appeared"
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saige.db"]


def test_help_documents_every_flag():
    result = run(SCRIPT, "--help")
    assert result.returncode == 0
    for flag in [
        "--db",
        "--output",
        "--format",
        "--max-harm",
        "--min-buddhist",
        "--min-alignment",
        "--limit",
        "--system-prompt",
        "--tokenizer",
        "--output-format",
        "--layout",
        "--best-per-scenario",
        "--dedup",
        "--include-gold",
        "--no-clean",
        "--dpo-output",
        "--dpo-margin",
        "--dpo-pairs",
        "--min-difficulty",
        "--max-difficulty",
        "--since",
        "--model-version",
        "--quiet",
    ]:
        assert flag in result.stdout, flag
    assert "tinyllama" in result.stdout and "chatml" in result.stdout and "(default: 0.3)" in result.stdout


@pytest.mark.parametrize(
    "answer, kept",
    [
        (
            "Call your doctor today. Keep the pill box with you. If you feel dizzy, go",
            "Call your doctor today. Keep the pill box with you.",
        ),
        ('She said "rest first." Then drink water and', 'She said "rest first."'),
        ("Done already!", "Done already!"),
        ("No full sentence here and then it just", "No full sentence here and then it just"),
        (
            "Ok. and then it goes on without an end",
            "Ok. and then it goes on without an end",
        ),  # "Ok." is too short to keep
    ],
)
def test_trim_unfinished_cuts_back_to_the_last_full_sentence(db_path, tmp_path, answer, kept):
    conn = sqlite3.connect(db_path)
    with conn:
        sid = saige_db.add_scenario(conn, "I took my pill twice.")
        saige_db.add_experience(conn, sid, answer, 0.0, scores(9))
    conn.close()
    out = tmp_path / "out.jsonl"
    result = run(SCRIPT, "--db", db_path, "-o", out, "--output-format", "jsonl", "--layout", "prompt-completion",
                 "--format", "chatml", "--trim-unfinished")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["completion"] == kept + "<|im_end|>\n"
    assert f"Trimmed: {int(kept != answer)} unfinished answers" in result.stderr


@pytest.mark.parametrize("trim", [True, False])
def test_open_unfinished_leaves_only_cut_answers_without_their_end(db_path, tmp_path, trim):
    conn = sqlite3.connect(db_path)
    with conn:
        sid = saige_db.add_scenario(conn, "I took my pill twice.")
        saige_db.add_experience(conn, sid, "Please call your pharmacist now. They can tell you whether", 0.0, scores(9))
        saige_db.add_experience(conn, sid, "Please call your pharmacist now.", 0.0, scores(8))
    conn.close()
    flags = ["--format", "chatml", "--open-unfinished", *(["--trim-unfinished"] if trim else [])]
    texts = {}
    for fmt in ("csv", "jsonl"):
        out = tmp_path / f"out.{fmt}"
        result = run(SCRIPT, "--db", db_path, "-o", out, "--output-format", fmt, *flags)
        assert result.returncode == 0, result.stderr
        assert "Open: 1 unfinished answers written without an end-of-turn marker" in result.stderr
        rows = csv.DictReader(out.open(newline="")) if fmt == "csv" else map(json.loads, out.open())
        texts[fmt] = [r["text"] for r in rows]
        assert json.loads((tmp_path / f"out.{fmt}.meta.json").read_text())["filters"]["open_unfinished"] is True
    assert texts["csv"] == texts["jsonl"]  # the CSV writer's fast path renders open answers alike
    cut = "Please call your pharmacist now." + ("" if trim else " They can tell you whether")
    opened, closed = sorted(texts["csv"], key=lambda t: t.endswith("<|im_end|>\n"))
    assert opened.endswith("assistant\n" + cut)  # no <|im_end|>: the turn stays open
    assert closed.endswith("assistant\nPlease call your pharmacist now.<|im_end|>\n")


def test_open_unfinished_is_refused_for_the_messages_layout(db_path, tmp_path):
    result = run(SCRIPT, "--db", db_path, "-o", tmp_path / "o.jsonl", "--output-format", "jsonl",
                 "--layout", "messages", "--open-unfinished")  # fmt: skip
    assert result.returncode == 2 and "--open-unfinished needs --layout text or prompt-completion" in result.stderr
    assert not (tmp_path / "o.jsonl").exists()
