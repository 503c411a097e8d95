# /// script
# requires-python = ">=3.9"
# dependencies = ["tqdm"]  # plus "transformers" for --format auto
# ///
"""Turn a SAIGE SQLite database into supervised fine-tuning (SFT) data.

Reads the `experiences` and `scenarios` tables of a SAIGE database (opened read-only), keeps the
experiences that pass the quality thresholds, and writes one training example per experience:
a CSV with a `text` column in a chat format (the default), or JSONL with `text`, `messages` or
`prompt`/`completion` rows, plus a sidecar `<output>.meta.json` that tells the trainer and the
evaluator which format and system prompt were used. Optionally writes DPO preference pairs. Scenarios kept for
evaluation are never trained on: those whose context hashes into --heldout-fraction (the split the collector and
the evaluator agree on) and the local worker's own held-out split.

Examples:
  python saige_to_sft.py --db ../saige.db --output saige_training_data.csv --format mistral
  python saige_to_sft.py --db saige.db -o train.jsonl --output-format jsonl --layout messages --dedup
  python saige_to_sft.py --db saige.db -o train.csv --format auto --tokenizer ./my-model --dpo-output pairs.jsonl

Safety: no output ever replaces an input (the database, its journal files, a tokenizer file), hard links and
symlinks included; every output folder is checked before the database is read; all outputs (data, pairs, sidecars)
are written to temp files and renamed together at the end, so a failed, interrupted or no-match run leaves every
existing file byte-identical. Rows that cannot be used (missing scenario, malformed JSON, non-numeric or infinite
numbers, BLOBs or invalid UTF-8 text, empty answers) are skipped and counted, never fatal.

Exit codes: 0 success; 1 bad input (missing, locked, damaged or non-SQLite database; an output folder that is
missing or not writable, an output that is a folder or a device); 2 usage error (bad flags, absurd numbers, an
output that is an input or another output); 6 nothing to write (no experience passed the filters: the funnel says
why); 130 interrupted (nothing written).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import itertools
import json
import operator
import os
import re
import secrets
import signal
import sqlite3
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

# --- defaults (the names and values users already type; see the README) -----------------------------
DEFAULT_DB = "../saige.db"
DEFAULT_OUTPUT = "saige_training_data.csv"
DEFAULT_FORMAT = "mistral"
DEFAULT_MAX_HARM = 0.3  # actual_harm is 0..1, lower is better
DEFAULT_MIN_BUDDHIST = 6.0  # weighted Buddhist score is 0..10
DEFAULT_MIN_ALIGNMENT = "good"  # "good" keeps good and excellent
DEFAULT_DPO_MARGIN = 1.0  # weighted-score points between chosen and rejected

# --- shared: system prompt (the same in every script: edit shared_blocks/system_prompt.py, then `make sync`) ----------
# The system prompt the converter trains with and the collector and evaluator prompt with: one text, so a model
# is asked at evaluation exactly as it was taught.
DEFAULT_SYSTEM_PROMPT = (
    "You are a wise and compassionate assistant. Speak truthfully, kindly and helpfully: "
    "never deceive, never belittle, never pressure, and always share what the person needs to know "
    "to stay safe. Answer with calm, balanced judgement."
)
# --- end shared: system prompt ----------------------------------------------------------------------------------------

# Float slack for the thresholds: a harm of (0.1+0.2+0.3+0.6)/4 is 0.30000000000000004 in binary, and
# users who type --max-harm 0.3 mean to keep it.
EPSILON = 1e-9

# --- shared: contract scores (the same in every script: edit shared_blocks/contract_scores.py, then `make sync`) ------
# The contract's Buddhist weighted score, alignment thresholds and order ("The Buddhist weighted score").
SCORE_WEIGHTS = {"ahimsa": 0.25, "sacca": 0.20, "karuna": 0.25, "panna": 0.20, "upekkha": 0.10}
ALIGNMENT_THRESHOLDS = [(8.0, "excellent"), (6.0, "good"), (4.0, "moderate")]  # else "low"
ALIGNMENT_LEVELS = ["low", "moderate", "good", "excellent"]
# --- end shared: contract scores --------------------------------------------------------------------------------------

# Chat layouts: (prompt with {system} and {user}, end of the answer). The text of one example is
# prompt + answer + end; the trainer splits it back at the end of the prompt to mask the prompt's loss.
# These match the models' own chat templates (tests/test_formats.py pins them).
TEMPLATES = {
    "tinyllama": ("<|system|>\n{system}</s>\n<|user|>\n{user}</s>\n<|assistant|>\n", "</s>"),
    # Mistral Instruct has no system role; a system prompt, when given, opens the [INST] block.
    "mistral": ("<s>[INST] {user} [/INST] ", "</s>"),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
    ),
    "chatml": (
        "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_end|>\n",
    ),
}
FORMATS = [*TEMPLATES, "auto"]
CSV_COLUMNS = [
    "text",
    "harm_score",
    "buddhist_alignment",
    "weighted_score",
    "difficulty",
    "scenario_id",
    "experience_id",
]
REQUIRED_COLUMNS = {
    "experiences": {
        "id",
        "scenario_id",
        "ai_response",
        "actual_harm",
        "harm_breakdown",
        "buddhist_scores",
        "buddhist_alignment",
        "model_version",
        "timestamp",
    },
    "scenarios": {"id", "context", "person_state", "difficulty_level", "expected_response"},
}

# Response cleanup: role prefixes a model put before its answer, and the start of a follow-up turn it
# invented (a "User:" line, or a chat-template marker) after which nothing is the assistant's answer.
ROLE_PREFIX = re.compile(r"^\s*(?:(?:ai|assistant|bot|answer|response)\s*:\s*)+", re.IGNORECASE)
INVENTED_TURN = re.compile(
    r"(?:^|\n)\s*(?:user|human|person|q|question)\s*:|<\|user\|>|<\|im_start\|>|\[INST\]|<\|start_header_id\|>",
    re.IGNORECASE,
)

BATCH_ROWS = 256  # rows fetched, rendered and written at a time: a few hundred KB, whatever the database size

# 6, not 1: a script (the pipeline) must tell "nothing passed the filters" from a bad input without reading stderr
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NO_MATCH, EXIT_INTERRUPTED = 0, 1, 2, 6, 130


class CliError(Exception):
    """An expected failure, reported as one line on stderr."""

    exit_code = EXIT_FAILURE


class NoMatch(CliError):
    """Valid input from which nothing is left to write."""

    exit_code = EXIT_NO_MATCH


# --- shared: safe paths (the same in every script: edit shared_blocks/safe_paths.py, then `make sync`) -------
def same_file(a, b) -> bool:
    """Whether two paths name one file: the same inode (hard links and symlinks included) or, for a path that does
    not exist yet, the same resolved path. None and '-' (stdin/stdout) name no file."""
    if not a or not b or str(a) == "-" or str(b) == "-":
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def path_clash(outputs: dict, inputs: dict) -> str | None:
    """A sentence naming the first output that is an input or another output, else None. Both map a flag (such as
    '--output') to a path; checked before any work, so no run can ever overwrite what it reads."""
    named = [(flag, path) for flag, path in outputs.items() if path and str(path) != "-"]
    for i, (flag, path) in enumerate(named):
        for source_flag, source in inputs.items():
            if same_file(path, source):
                return f"{flag} {path} is the same file as {source_flag} {source}; choose another {flag}"
        for other_flag, other in named[:i]:
            if same_file(path, other):
                return f"{flag} {path} and {other_flag} {other} are the same file; give each its own path"
    return None


def unwritable(path) -> str | None:
    """Why a file cannot be written at `path` (a folder, a missing or read-only folder), else None. Tried by creating
    and removing a probe file beside it: root's os.access says yes even on a read-only mount."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return f"{path} is a folder, not a file"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"folder {os.path.dirname(path) or folder} does not exist"
    probe = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.probe")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as e:
        return f"cannot write in folder {folder} ({e.strerror})"
    return None


# --- end shared: safe paths ---------------------------------------------------------------------------------


# --- shared: heldout split (the same in every script: edit shared_blocks/heldout.py, then `make sync`) ------
HELDOUT_FRACTION = 0.25  # the pipeline's default share of scenarios kept for evaluation only (HELDOUT_FRACTION)


def is_heldout(context, fraction: float) -> bool:
    """Whether a scenario is held out (evaluated, never trained on) at this fraction of all scenarios.

    Decided by a hash of the scenario's context text, whitespace folded: every script, every copy of a database
    and every D1 export agree without asking the worker, even where a copied scenario got another id. A scenario
    held out at one fraction stays held out at any larger one."""
    if fraction <= 0 or not isinstance(context, str):
        return False
    digest = hashlib.sha256(b"saige-heldout\0" + fold(context).encode("utf-8", "replace")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def fold(context) -> str:
    """A scenario's text as the split sees it: whitespace folded."""
    return " ".join(str(context).split())


# --- end shared: heldout split ----------------------------------------------------------------------------


# --- shared: heldout suite (the same in every script: edit shared_blocks/heldout_suite.py, then `make sync`) ----
def suite_contexts(path) -> set[str]:
    """The folded contexts of a JSON array or JSONL file of scenarios (the evaluator's --suite), to hold out too.
    Raises ValueError with one line when the file is not that."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        rows = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"cannot read the scenarios of {path} ({str(e).splitlines()[0][:80]})") from None
    found = {fold(r["context"]) for r in rows if isinstance(r, dict) and isinstance(r.get("context"), str)}
    if not found:
        raise ValueError(f"{path} holds no scenario with a context")
    return found


# --- end shared: heldout suite -----------------------------------------------------------------------------


# --- shared: d1 dump (the same in every script: edit shared_blocks/d1_dump.py, then `make sync`) -------------
# What a `wrangler d1 export` of a SAIGE database holds: the contract's tables (and D1's own bookkeeping), their
# indexes and their rows. Any other statement is refused: the file is data, never a script to run.
D1_TABLES = {
    "scenarios",
    "experiences",
    "causal_patterns",
    "model_versions",
    "sqlite_sequence",
    "d1_migrations",
    "scenario_splits",
}
D1_TABLE = r"""(?:"(?P<q>[^"]+)"|`(?P<b>[^`]+)`|\[(?P<s>[^\]]+)\]|(?P<n>\w+))"""
D1_STATEMENTS = [
    re.compile(pattern, re.I | re.S)
    for pattern in (
        r"PRAGMA\s+(?:defer_foreign_keys|foreign_keys)\s*=\s*\w+\s*;",
        r"(?:BEGIN(?:\s+TRANSACTION)?|COMMIT|END(?:\s+TRANSACTION)?)\s*;",
        rf"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?{D1_TABLE}\s*\(.*\)\s*;",
        rf"CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?:IF\s+NOT\s+EXISTS\s+)?[\w\"`\[\]]+\s+ON\s+{D1_TABLE}\s*\(.*\)\s*;",
        rf"INSERT\s+(?:OR\s+\w+\s+)?INTO\s+{D1_TABLE}\s*(?:\([^;]*?\))?\s*VALUES\s*\(.*\)\s*;",
        rf"DELETE\s+FROM\s+{D1_TABLE}\s*;",
        r"ANALYZE\s+sqlite_schema\s*;",
    )
]


def is_sql_dump(path) -> bool:
    """Whether --db names a SQL text file (a `wrangler d1 export`) rather than a SQLite database."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return str(path).lower().endswith(".sql")
    if head.startswith(b"SQLite format 3\x00"):
        return False
    text = head.lstrip().upper()
    return str(path).lower().endswith(".sql") or text.startswith((b"PRAGMA", b"CREATE", b"INSERT", b"BEGIN", b"--"))


def d1_statement_ok(statement: str) -> bool:
    for pattern in D1_STATEMENTS:
        match = pattern.fullmatch(statement)
        if match:
            table = next((match.group(g) for g in "qbsn" if match.groupdict().get(g)), None)
            return table is None or table.lower() in D1_TABLES
    return False


def load_d1_dump(path, target) -> None:
    """Run a `wrangler d1 export` file into the new SQLite database `target`, one checked statement at a time.
    Raises ValueError with one line for anything that is not SAIGE's tables and rows."""
    conn = sqlite3.connect(target, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = OFF")  # a scratch copy: nothing to recover if the run stops
        conn.execute("BEGIN")
        pending, first_line = "", 1
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not pending and (not line.strip() or line.lstrip().startswith("--")):
                    first_line = number + 1
                    continue
                pending += line
                if not sqlite3.complete_statement(pending):
                    continue
                statement, pending = pending.strip(), ""
                if not d1_statement_ok(statement):
                    raise ValueError(f"line {first_line}: not a SAIGE table, index or row: {statement[:60]!r}")
                if not re.match(r"(BEGIN|COMMIT|END)\b", statement, re.I):  # one transaction of our own
                    conn.execute(statement)
                first_line = number + 1
        if pending.strip():
            raise ValueError(f"line {first_line}: the file ends inside a statement (a truncated export?)")
        conn.execute("COMMIT")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except sqlite3.Error as e:
        raise ValueError(f"line {first_line}: {e}") from None
    finally:
        conn.close()


def sql_dump_copy(path) -> str:
    """A temporary SQLite copy of a SQL dump (the caller removes it); raises ValueError with one line."""
    import tempfile

    fd, target = tempfile.mkstemp(prefix="saige-d1-", suffix=".db")
    os.close(fd)
    try:
        load_d1_dump(path, target)
    except BaseException:
        os.unlink(target)
        raise
    return target


# --- end shared: d1 dump -----------------------------------------------------------------------------------


# --- the SQL: one classification of every experience, shared by the selection and the report -------
# A row is classified by the first rule it breaks, so the report can say how many rows each filter removed.
# Cheap rules come first: the JSON columns are parsed only for rows that pass the harm and alignment
# thresholds (a million-row scan spends most of its time in JSON otherwise). Every JSON function sits inside a
# CASE behind typeof and json_valid (json_extract raises on malformed text, and newer SQLite reads a BLOB as JSONB),
# because SQLite does not promise to short-circuit AND. A missing principle counts as malformed.
RANK_CASES = " ".join(f"WHEN '{a}' THEN {i}" for i, a in enumerate(ALIGNMENT_LEVELS))
# the exact words first; lower(trim()) only for the rare messy spelling
ALIGNMENT_RANK = (
    f"COALESCE(CASE e.buddhist_alignment {RANK_CASES} END, CASE lower(trim(e.buddhist_alignment)) {RANK_CASES} END)"
)
WEIGHTED = " + ".join(f"{w:.2f} * json_extract(e.buddhist_scores, '$.{k}')" for k, w in SCORE_WEIGHTS.items())
# SQLite stores 1e999 as an infinite REAL (and NaN as NULL); a finite number is at most the largest double.
FINITE = "abs({}) <= 1.7976931348623157e308"
JSON_COLUMNS = ("e.buddhist_scores", "e.harm_breakdown", "s.person_state")
JSON_OK = " AND ".join(
    f"CASE WHEN typeof({c}) != 'text' OR NOT json_valid({c}) THEN 0 ELSE json_type({c}) = 'object' END"
    for c in JSON_COLUMNS
)
# 1 when every principle is a number, 0 when one is not (a string, a list, null), NULL when one is missing
SCORES_NUMERIC = " AND ".join(f"json_type(e.buddhist_scores, '$.{k}') IN ('integer', 'real')" for k in SCORE_WEIGHTS)
# What makes a row that passed the cheap rules unusable, or NULL: evaluated only when the stage CASE gets there, each
# test once. A score of 1e999 is a number, so it shows as a weighted score that is infinite (or NaN, stored as NULL).
# utf8_ok() is a Python function: SQLite keeps any bytes as TEXT, and Python cannot decode invalid UTF-8 on fetch.
DEFECT = f"""CASE WHEN NOT ({JSON_OK}) THEN 'malformed' ELSE CASE {SCORES_NUMERIC}
    WHEN 0 THEN 'number'
    WHEN 1 THEN CASE
      WHEN NOT COALESCE({FINITE.format(WEIGHTED)}, 0) THEN 'number'
      WHEN NOT utf8_ok(CAST(e.ai_response AS BLOB), CAST(s.context AS BLOB), CAST(s.person_state AS BLOB))
        THEN 'encoding'
      END
    ELSE 'malformed' END
  END"""
CLASSIFIED_SQL = f"""
WITH scored AS (
  SELECT e.id, e.scenario_id, e.ai_response, e.actual_harm, e.timestamp, e.model_version,
         lower(trim(e.buddhist_alignment)) AS alignment, {ALIGNMENT_RANK} AS alignment_rank, s.id AS sid, s.context,
         s.person_state, s.difficulty_level AS difficulty,
         typeof(e.ai_response) AS response_type, typeof(s.context) AS context_type,
         typeof(e.buddhist_alignment) AS alignment_type,
         CASE WHEN {JSON_OK} THEN {WEIGHTED} END AS weighted,
         {DEFECT} AS defect,
         -- rows mix '2026-01-31T10:54:57.175Z' and '2026-01-31 10:54:58', which sort wrongly as text
         julianday(e.timestamp) AS day
  FROM experiences e NOT INDEXED LEFT JOIN scenarios s ON s.id = e.scenario_id
), classified AS (
  SELECT *, CASE
    WHEN sid IS NULL THEN 'orphan'
    WHEN typeof(actual_harm) NOT IN ('integer', 'real') OR NOT {FINITE.format("actual_harm")}
      OR typeof(difficulty) NOT IN ('integer', 'null') THEN 'number'
    WHEN response_type NOT IN ('text', 'null') OR context_type != 'text' OR alignment_type = 'blob' THEN 'encoding'
    WHEN ai_response IS NULL OR trim(ai_response) = '' THEN 'empty'
    WHEN {{heldout}} THEN 'heldout'
    WHEN NOT ({{scope}}) THEN 'scope'
    WHEN actual_harm > :max_harm + {EPSILON} THEN 'harm'
    WHEN COALESCE(alignment_rank, -1) < :min_rank THEN 'alignment'
    WHEN defect IS NOT NULL THEN defect
    WHEN weighted < :min_buddhist - {EPSILON} THEN 'score'
    ELSE 'selected' END AS stage
  FROM scored
)"""
ORDER_SQL = "ORDER BY actual_harm ASC, day DESC, id DESC"  # the contract's order: lowest harm, newest first
FUNNEL = [  # (stage, what removed it) in the order the report lists them; the first five are unusable rows
    ("orphan", "scenario row missing"),
    ("malformed", "NULL or malformed JSON"),
    ("number", "non-numeric or non-finite harm, score or difficulty"),
    ("encoding", "binary or invalid UTF-8 text"),
    ("empty", "empty response"),
    ("heldout", "held-out scenario (evaluation only: --heldout-fraction or the local worker's held-out split)"),
    ("scope", "outside --since/--min-difficulty/--max-difficulty/--model-version"),
    ("harm", "harm above --max-harm"),
    ("alignment", "alignment below --min-alignment"),
    ("score", "weighted score below --min-buddhist"),
]
UNUSABLE = 5  # FUNNEL[:UNUSABLE] are the rows no threshold could keep: the report's "Skipped rows"


def scope_sql(args: argparse.Namespace) -> str:
    """The optional where-style filters, as SQL over named parameters."""
    parts = ["1"]
    if args.min_difficulty is not None:
        parts.append("difficulty >= :min_difficulty")
    if args.max_difficulty is not None:
        parts.append("difficulty <= :max_difficulty")
    if args.since is not None:
        parts.append("day >= julianday(:since)")
    if args.model_version is not None:
        parts.append("model_version = :model_version")
    return " AND ".join(parts)


def classified_sql(args: argparse.Namespace) -> str:
    """Every experience with the stage that removed or selected it; held-out scenarios are in temp.heldout."""
    heldout = "sid IN (SELECT id FROM temp.heldout)" if getattr(args, "heldout_scenarios", 0) else "0"
    return CLASSIFIED_SQL.replace("{scope}", scope_sql(args)).replace("{heldout}", heldout)


def mark_heldout(conn: sqlite3.Connection, fraction: float, suite: set) -> int:
    """Fill temp.heldout with the scenarios never to train on: those whose context hashes into the held-out
    fraction, and those the local worker keeps for evaluation (its scenario_splits table); returns how many."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS heldout (id INTEGER PRIMARY KEY)")
    if fraction > 0 or suite:
        # as bytes: a context of invalid UTF-8 must not stop the run here (its rows are counted as 'encoding')
        rows = conn.execute("SELECT id, CAST(context AS BLOB) FROM scenarios WHERE typeof(context) = 'text'").fetchall()
        texts = ((i, bytes(text).decode("utf-8", "replace")) for i, text in rows)
        held = [(i,) for i, text in texts if is_heldout(text, fraction) or fold(text) in suite]
        conn.executemany("INSERT OR IGNORE INTO temp.heldout VALUES (?)", held)
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'scenario_splits'").fetchone():
        conn.execute(
            "INSERT OR IGNORE INTO temp.heldout SELECT scenario_id FROM scenario_splits WHERE split = 'heldout'"
        )
    return conn.execute("SELECT COUNT(*) FROM temp.heldout").fetchone()[0]


def sql_params(args: argparse.Namespace) -> dict:
    return {
        "max_harm": args.max_harm,
        "min_rank": ALIGNMENT_LEVELS.index(args.min_alignment),
        "min_buddhist": args.min_buddhist,
        "min_difficulty": args.min_difficulty,
        "max_difficulty": args.max_difficulty,
        "since": args.since,
        "model_version": args.model_version,
        "k": args.best_per_scenario,
        "margin": args.dpo_margin,
        "each_worse": args.dpo_pairs == "each",
    }


def selection_sql(args: argparse.Namespace) -> str:
    """The selected experiences, best-per-scenario and dedup applied, in the contract's order."""
    base = classified_sql(args)
    # the stage counters count every row's stage as SQLite scans it, so one pass gives both the rows and the report
    rows = f"SELECT * FROM classified WHERE {StageCounter.keeps_selected('stage')}"
    if args.dedup:  # keep the lowest-harm, newest copy of each (scenario, normalised answer)
        rows = (
            "SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY scenario_id, dedup_key(ai_response)"
            f" ORDER BY actual_harm, day DESC, id DESC) AS copy FROM ({rows})) WHERE copy = 1"
        )
    if args.best_per_scenario:
        rows = (
            "SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY scenario_id"
            f" ORDER BY weighted DESC, actual_harm, day DESC, id DESC) AS rank FROM ({rows})) WHERE rank <= :k"
        )
    columns = "id, scenario_id, ai_response, actual_harm, alignment, weighted, difficulty"
    return f"{base} SELECT {columns} FROM ({rows}) {ORDER_SQL}"


def dpo_sql(args: argparse.Namespace) -> str:
    """Per scenario: the best selected experience and the worst valid one (--dpo-pairs each: every valid one, worst
    first), when their scores differ enough."""
    base = classified_sql(args)
    return f"""{base}, valid AS (
  -- rows a threshold removed are still fair rejected answers, once they pass the checks the selected rows passed
  SELECT * FROM classified WHERE stage IN ('harm', 'alignment', 'score', 'selected') AND defect IS NULL
), best AS (
  SELECT *, ROW_NUMBER() OVER (PARTITION BY scenario_id ORDER BY weighted DESC, actual_harm, day DESC, id DESC) AS r
  FROM valid WHERE stage = 'selected'
), worst AS (
  SELECT *, ROW_NUMBER() OVER (PARTITION BY scenario_id ORDER BY weighted, actual_harm DESC, day DESC, id DESC) AS r
  FROM valid
)
SELECT b.scenario_id, b.id AS chosen_id, b.ai_response AS chosen,
       b.weighted AS chosen_score, b.actual_harm AS chosen_harm, w.id AS rejected_id, w.ai_response AS rejected,
       w.weighted AS rejected_score, w.actual_harm AS rejected_harm
FROM best b JOIN worst w ON w.scenario_id = b.scenario_id AND (w.r = 1 OR :each_worse)
WHERE b.r = 1 AND b.id != w.id AND b.weighted - w.weighted >= :margin - {EPSILON} AND w.actual_harm >= b.actual_harm
ORDER BY b.scenario_id, w.r"""


GOLD_SQL = """SELECT id AS scenario_id, difficulty_level AS difficulty, expected_response
FROM scenarios WHERE typeof(expected_response) = 'text' AND typeof(context) = 'text'
  AND typeof(difficulty_level) IN ('integer', 'null') AND trim(expected_response) != ''
  AND CASE WHEN typeof(person_state) != 'text' OR NOT json_valid(person_state) THEN 0
      ELSE json_type(person_state) = 'object' END
  AND utf8_ok(CAST(expected_response AS BLOB), CAST(context AS BLOB), CAST(person_state AS BLOB))
  AND (:min_difficulty IS NULL OR difficulty_level >= :min_difficulty)
  AND (:max_difficulty IS NULL OR difficulty_level <= :max_difficulty)
  AND id NOT IN (SELECT id FROM temp.heldout)
ORDER BY id"""


# --- input -------------------------------------------------------------------------------------------
SQLITE_HEADER = b"SQLite format 3\x00"
BUSY_TIMEOUT_S = 5.0  # a worker's write holds the lock for milliseconds; a lock held longer is reported, not waited out


def open_database(real: str, shown: str | None = None) -> sqlite3.Connection:
    """Open a SAIGE database read-only and check its tables; raise CliError with a sentence if it isn't one.
    Every later query runs in one read transaction, so the rows, the report and the sidecar see one snapshot.
    `shown` is the name the user gave (a SQL dump's, when `real` is its temporary copy)."""
    path = shown or real
    db = Path(real)
    if path == real:  # a dump's temporary copy was made by us: it may be empty, and its tables are checked below
        check_database_file(db, path)
    conn = sqlite3.connect(
        f"file:{quote(db.resolve().as_posix())}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None
    )
    try:
        conn.execute("BEGIN")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, needed in REQUIRED_COLUMNS.items():
            if table not in tables:
                raise CliError(f"{path} has no '{table}' table; is it a SAIGE database?")
            have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
            if needed - have:
                raise CliError(f"table '{table}' in {path} lacks column(s): {', '.join(sorted(needed - have))}")
    except sqlite3.Error as e:
        conn.close()
        raise CliError(database_problem(path, e)) from None
    except CliError:
        conn.close()
        raise
    conn.row_factory = sqlite3.Row
    conn.create_function("dedup_key", 1, dedup_key, deterministic=True)
    conn.create_function("utf8_ok", -1, utf8_ok, deterministic=True)
    return conn


def check_database_file(db: Path, path: str) -> None:
    """A readable SQLite file, or a CliError that says what the file is instead."""
    if db.is_dir():
        raise CliError(f"--db {path} is a folder; pass the database file (e.g. --db {db / 'saige.db'})")
    if not db.exists():
        raise CliError(f"database not found: {path} (pass --db PATH to your saige.db)")
    if not db.is_file():
        raise CliError(f"--db {path} is not a regular file (a pipe or a device); pass --db PATH to your saige.db")
    try:
        with open(db, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError as e:
        raise CliError(f"cannot read database {path} ({e.strerror}); check its permissions") from None
    if not header:
        raise CliError(f"{path} is an empty file, not a SQLite database; pass --db PATH to your saige.db")
    if header != SQLITE_HEADER:
        raise CliError(f"{path} is not a SQLite database (no SQLite header); pass --db PATH to your saige.db")


def database_problem(path: str, error: sqlite3.Error) -> str:
    """What a SQLite error means for the user, and what to do about it."""
    text = str(error)
    if "locked" in text or "busy" in text:
        return (
            f"database {path} is locked by another program (a worker or collector writing to it); "
            "try again when it has finished, or convert a copy of the file"
        )
    if "disk I/O error" in text:
        return f"cannot read database {path} (disk I/O error); check the disk, or copy the file and convert the copy"
    if "not a database" in text:
        return f"{path} is not a SQLite database ({text}); pass --db PATH to your saige.db"
    if "disk image is malformed" in text or "corrupt" in text:
        return f"database {path} is damaged ({text}); restore it from a backup or sync it again from the worker"
    if "unable to open" in text or "readonly" in text or "permission" in text.lower():
        return f"cannot open database {path} ({text}); check the permissions of the file and of its folder"
    return f"cannot read database {path} ({text})"


def utf8_ok(*values) -> int:
    """1 when every value (TEXT cast to BLOB, or NULL) is valid UTF-8, else 0 (the SQL's utf8_ok)."""
    try:
        for value in values:
            if value is not None and not value.isascii():  # isascii(): most text, checked without a copy
                bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        return 0
    return 1


class StageCounter:
    """Counts each row's stage as SQLite scans it. SQLite calls one counter per row, the C __next__ of the stage's
    itertools.count: a Python function taking the stage cost five times as much (0.35 s a million rows)."""

    STAGES = [stage for stage, _ in FUNNEL] + ["selected"]

    def __init__(self, conn: sqlite3.Connection):
        self.counters = {stage: itertools.count() for stage in self.STAGES}
        for stage, counter in self.counters.items():
            conn.create_function(f"count_{stage}", 0, counter.__next__)
        # no Python runs per row any more, so Ctrl-C would wait for the end of the scan: look at signals now and then
        conn.set_progress_handler(lambda: 0, 100_000)

    @classmethod
    def keeps_selected(cls, stage: str) -> str:
        """SQL that counts the row's stage (evaluating `stage` once) and is true for a selected row only."""
        whens = " ".join(f"WHEN '{s}' THEN count_{s}() {'>=' if s == 'selected' else '<'} 0" for s in cls.STAGES)
        return f"CASE {stage} {whens} END"

    def funnel(self) -> Counter:
        """The rows counted at each stage; read it once, when the scan is over (reading a counter adds one)."""
        return Counter({stage: n for stage, counter in self.counters.items() if (n := next(counter))})


def clean_response(text: str) -> str:
    """Strip role prefixes, cut invented follow-up turns, drop NUL characters, trim whitespace."""
    if "\0" in text:  # a sampled NUL token: no text means it, and CSV and data-file checks read it as binary
        text = text.replace("\0", "")
    # most answers: skip the regexes. Looking for "|" and "[" first is the same test, faster: a one-character search
    # is a memchr, a two-character one was 6x slower on a 1 KB answer.
    if ":" not in text and ("|" not in text or "<|" not in text) and ("[" not in text or "[INST]" not in text):
        return text.strip()
    text = ROLE_PREFIX.sub("", text or "")
    turn = INVENTED_TURN.search(text)
    if turn:
        text = text[: turn.start()]
    return text.strip()


# the longest prefix that ends a sentence: . ! ? (or …) with any closing quote or bracket, then space or the end
LAST_SENTENCE = re.compile(r".*[.!?\u2026][\"')\]\u201d\u2019]*(?=\s|$)", re.S)


def trim_unfinished(text: str) -> str:
    """An answer cut mid-sentence (by a generation limit) back to its last full sentence, so the model does not
    learn to stop mid-thought; an answer without a full sentence of three words or more is kept whole."""
    text = text.rstrip()
    if not text or text[-1] in ".!?\u2026\"')]\u201d\u2019":
        return text
    match = LAST_SENTENCE.match(text)
    return match.group(0) if match and len(match.group(0).split()) >= 3 else text


def dedup_key(text: str | None) -> str:
    """Answers that differ only in case, spacing, punctuation or a role prefix share a key."""
    words = re.findall(r"\w+", clean_response(text or "").lower())
    return hashlib.blake2b(" ".join(words).encode(), digest_size=16).hexdigest()


def user_turn(context: str, person_state: dict) -> str:
    """The scenario as the user's message, with a note of the person's state when it matters (contract)."""
    mood = str(person_state.get("mood") or "neutral")
    vulnerability = str(person_state.get("vulnerability") or "low")
    if mood == "neutral" and vulnerability == "low":
        return context.strip()
    return f"{context.strip()}\n\n[Person's state: mood {mood}, vulnerability {vulnerability}]"


# --- formats -----------------------------------------------------------------------------------------
class ChatTemplate(NamedTuple):
    """How one example is rendered: the prompt (with {system} and {user}), what ends an answer, and the system
    prompt actually used (None for a layout without a system role and no --system-prompt)."""

    prompt: str
    end: str
    system: str | None

    def render(self, user: str) -> str:
        """The prompt filled in (str.replace, because system prompts and contexts may contain braces)."""
        return self.prompt.replace("{system}", self.system or "").replace("{user}", user)


def resolve_template(fmt: str, tokenizer: str | None, system_prompt: str | None) -> ChatTemplate:
    """The chat template of a format name."""
    if fmt == "auto":
        return template_from_tokenizer(tokenizer, system_prompt or DEFAULT_SYSTEM_PROMPT)
    prompt, end = TEMPLATES[fmt]
    if "{system}" in prompt:
        return ChatTemplate(prompt, end, system_prompt or DEFAULT_SYSTEM_PROMPT)
    if system_prompt:  # only an explicit --system-prompt goes into a layout without a system role
        return ChatTemplate(prompt.replace("{user}", "{system}\n\n{user}"), end, system_prompt)
    return ChatTemplate(prompt, end, None)


def template_from_tokenizer(name: str, system_prompt: str) -> ChatTemplate:
    """Derive (prompt, end) from a tokenizer's own chat template by rendering placeholder messages."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CliError("--format auto needs transformers: pip install transformers") from None
    path = Path(name)
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent) if kwargs else name, **kwargs)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a missing or bad tokenizer
        raise CliError(f"cannot load tokenizer {name!r}: {str(e).splitlines()[0]}") from None
    if not tok.chat_template:
        raise CliError(f"tokenizer {name!r} has no chat template; choose --format tinyllama|mistral|llama3|chatml")
    answer = "\x00ANSWER\x00"
    chat = [{"role": "user", "content": "{user}"}, {"role": "assistant", "content": answer}]
    try:
        rendered = tok.apply_chat_template([{"role": "system", "content": "{system}"}, *chat], tokenize=False)
    except Exception:  # noqa: BLE001 - templates without a system role raise from inside jinja
        chat[0]["content"] = "{system}\n\n{user}"
        rendered = tok.apply_chat_template(chat, tokenize=False)
    prompt, _, end = rendered.partition(answer)
    return ChatTemplate(prompt, end, system_prompt)


def make_row(layout: str, template: ChatTemplate, user: str, answer: str, end: str | None = None) -> dict:
    """One training example in the chosen layout; `end` "" leaves the assistant turn open (--open-unfinished)."""
    end = template.end if end is None else end
    if layout == "messages":
        system_turn = [{"role": "system", "content": template.system}] if template.system else []
        return {"messages": [*system_turn, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
    if layout == "prompt-completion":
        return {"prompt": template.render(user), "completion": answer + end}
    return {"text": template.render(user) + answer + end}


# --- output ------------------------------------------------------------------------------------------
class OutputSet:
    """Every file of a run, each written to a temp file beside its target and all renamed at the end: a run that
    fails or is interrupted at any point leaves every pre-existing output byte-identical, and no temp file behind."""

    def __init__(self):
        self.staged: list[tuple[str, str]] = []  # (temp file, target)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for tmp, _ in self.staged:  # only a failed run still has temp files
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self.staged = []
        return False

    @contextlib.contextmanager
    def open(self, path: str):
        """A text file to write `path`'s new content into ('-' is stdout, written as it comes)."""
        if path == "-":
            yield sys.stdout
            sys.stdout.flush()
            return
        tmp = os.path.join(Path(path).resolve().parent, f".{Path(path).name}.{secrets.token_hex(6)}.tmp")
        self.staged.append((tmp, path))  # before the file exists, so a Ctrl-C at any point leaves no temp file
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # the umask applies, as for any new file
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            yield f

    def commit(self) -> None:
        """Rename every temp file onto its target; if one rename fails (or Ctrl-C lands here), the targets already
        replaced get their old content back from a hard link made just before."""
        done, backup = [], None  # done: (target, its backup, or None when the target did not exist)
        try:
            for tmp, target in self.staged:
                backup = None
                backup = self.backup(target)
                os.replace(tmp, target)
                done.append((target, backup))
                backup = None
        except BaseException:
            for target, old in reversed(done):
                with contextlib.suppress(OSError):
                    os.replace(old, target) if old else os.unlink(target)
            raise
        finally:
            for old in [backup, *(old for _, old in done)]:
                if old:
                    with contextlib.suppress(OSError):
                        os.unlink(old)
        self.staged = []

    @staticmethod
    def backup(target: str) -> str | None:
        if not os.path.isfile(target):
            return None
        backup = os.path.join(os.path.dirname(os.path.abspath(target)), f".{Path(target).name}.{os.getpid()}.bak")
        try:
            os.link(target, backup)
        except OSError:  # a file system without hard links: no rollback for this file
            return None
        return backup


class Stats:
    """Running statistics over the written experiences (constant memory, however many rows)."""

    def __init__(self):
        self.n = 0
        self.harm_sum = self.weighted_sum = 0.0
        self.harm_min = self.weighted_min = float("inf")
        self.harm_max = self.weighted_max = float("-inf")
        self.alignment: Counter = Counter()
        self.difficulty: Counter = Counter()

    def add(self, harm: float, weighted: float, alignment: str, difficulty: int) -> None:
        self.n += 1
        self.harm_sum += harm
        self.weighted_sum += weighted
        if harm < self.harm_min:
            self.harm_min = harm
        if harm > self.harm_max:
            self.harm_max = harm
        if weighted < self.weighted_min:
            self.weighted_min = weighted
        if weighted > self.weighted_max:
            self.weighted_max = weighted
        self.alignment[alignment] += 1
        self.difficulty[difficulty] += 1

    def add_rows(self, rows: list) -> None:
        """add() for each selected row (selection_sql()'s columns), in C loops: reduce() adds in the same order as
        add() (sum() of floats need not, from Python 3.12), and min() and max() keep the first of equal values, as
        add()'s strict comparisons do."""
        if not rows:
            return
        _, _, _, harms, alignments, weights, difficulties = zip(*rows)
        self.n += len(rows)
        self.harm_sum = functools.reduce(operator.add, harms, self.harm_sum)
        self.weighted_sum = functools.reduce(operator.add, weights, self.weighted_sum)
        self.harm_min, self.harm_max = min(self.harm_min, min(harms)), max(self.harm_max, max(harms))
        self.weighted_min = min(self.weighted_min, min(weights))
        self.weighted_max = max(self.weighted_max, max(weights))
        self.alignment.update(alignments)
        self.difficulty.update(difficulties)


def user_turns(conn: sqlite3.Connection):
    """A cached scenario id -> user turn lookup: a few thousand scenarios serve a million experiences."""
    from functools import lru_cache

    # SQLite reads the two fields: Python's json module rejects what SQLite accepts (deep nesting), and a "\ud800"
    # escape becomes bytes that are not UTF-8, so the values come as bytes and decode leniently.
    query = (
        "SELECT context, CAST(json_extract(person_state, '$.mood') AS BLOB) AS mood,"
        " CAST(json_extract(person_state, '$.vulnerability') AS BLOB) AS vulnerability FROM scenarios WHERE id = ?"
    )

    @lru_cache(maxsize=65536)
    def lookup(scenario_id: int) -> str:
        row = conn.execute(query, (scenario_id,)).fetchone()
        state = {k: None if row[k] is None else row[k].decode("utf-8", "replace") for k in ("mood", "vulnerability")}
        return user_turn(row["context"], state)

    return lookup


def example_rows(rows, args, template, user_for, stats: Stats, counts: Counter):
    """(example, metadata in CSV column order) for each selected row; cleans answers, honours --limit."""
    for eid, sid, raw, harm, alignment, weighted, difficulty in rows:  # selection_sql()'s columns
        if args.limit is not None and counts["written"] >= args.limit:
            break
        answer, end = final_answer(raw, args, counts, template.end)
        if answer is None:
            continue
        meta = (harm, alignment, round(weighted, 4), difficulty, sid, eid)
        stats.add(harm, weighted, alignment, difficulty)
        counts["written"] += 1
        example = make_row(args.layout, template, user_for(sid), answer, end)
        yield example, (*meta, "experience") if args.include_gold else meta


def final_answer(raw: str, args, counts: Counter, end: str) -> tuple[str | None, str]:
    """(the answer as written, cleaned and trimmed as asked, or None when cleanup left nothing; what ends its turn:
    `end`, or "" for an answer cut by a generation limit under --open-unfinished). Counts what it did."""
    answer = clean_response(raw) if args.clean else raw
    if not answer.strip():
        counts["dropped_empty_after_cleanup"] += 1
        return None, end
    unfinished = trim_unfinished(answer) != answer.rstrip()
    if args.trim_unfinished and unfinished:
        answer = trim_unfinished(answer)
        counts["trimmed_unfinished"] += 1
    if len(answer) != len(raw) and answer != raw.strip():
        counts["cleaned"] += 1
    if args.open_unfinished and unfinished:
        counts["open_unfinished"] += 1
        return answer, ""
    return answer, end


def csv_text_lines(rows, args, template: ChatTemplate, user_for, stats: Stats, counts: Counter):
    """Lists of CSV lines, byte for byte what example_rows() and csv_field() made of the selected rows, a batch at a
    time and without a dict, a tuple and seven csv_field() calls per row (they were most of the Python time of a
    million-row run). `rows` yields lists of plain tuples in selection_sql()'s column order."""
    prompts = PromptFields(template, user_for)
    source = ",experience" if args.include_gold else ""
    ends = {e: (e.replace('"', '""'), needs_quotes(e)) for e in ("", template.end)}  # "": --open-unfinished
    for batch in rows:
        lines, kept = [], []
        for row in batch:
            eid, sid, raw, harm, alignment, weighted, difficulty = row
            if args.limit is not None and counts["written"] >= args.limit:
                break
            answer, end = final_answer(raw, args, counts, template.end)
            if answer is None:
                continue
            # str() of each value, as csv_field() writes it; none needs quotes (numbers, one of the alignment words)
            meta = f",{harm},{alignment},{round(weighted, 4)},{difficulty},{sid},{eid}{source}\r\n"
            prompt, escaped, quoted = prompts[sid]
            end_escaped, end_quoted = ends[end]
            # quoting the whole text is quoting each part: '"' is one character
            if quoted or end_quoted or needs_quotes(answer):
                lines.append('"' + escaped + answer.replace('"', '""') + end_escaped + '"' + meta)
            else:
                lines.append(f"{prompt}{answer}{end}{meta}")
            kept.append(row)
            counts["written"] += 1
        stats.add_rows(kept)
        yield lines
        if args.limit is not None and counts["written"] >= args.limit:
            return


def needs_quotes(text: str) -> bool:
    """Whether csv_field() quotes this text."""
    return '"' in text or "," in text or "\n" in text or "\r" in text


class PromptFields(dict):
    """scenario id -> (its rendered prompt, the same with '"' doubled, whether the prompt needs quotes)."""

    def __init__(self, template: ChatTemplate, user_for):
        super().__init__()
        self.template, self.user_for = template, user_for

    def __missing__(self, scenario_id):
        prompt = self.template.render(self.user_for(scenario_id))
        self[scenario_id] = value = (prompt, prompt.replace('"', '""'), needs_quotes(prompt))
        return value


def gold_rows(conn, args, template, user_for, counts: Counter):
    """Scenarios' reference answers as extra examples (--include-gold), never those of held-out scenarios."""
    for row in conn.execute(GOLD_SQL, sql_params(args)):
        user = user_for(row["scenario_id"])
        counts["gold"] += 1
        example = make_row(args.layout, template, user, row["expected_response"].strip())
        yield example, ("", "", "", row["difficulty"], row["scenario_id"], "", "gold")


def csv_field(value) -> str:
    """One RFC 4180 field, quoted only when needed. Written by hand because csv.writer's per-character loop
    was the slowest step on million-row outputs; these substring tests and str.replace run at memchr speed."""
    if not isinstance(value, str):
        return str(value)
    if '"' in value or "," in value or "\n" in value or "\r" in value:
        return '"' + value.replace('"', '""') + '"'
    return value


def write_jsonl(handle, rows, columns: list[str]) -> None:
    """Write JSONL in batches of lines (one write call per line was measurably slow)."""
    meta_columns = columns[1:]
    lines = (json.dumps({**ex, **dict(zip(meta_columns, meta))}, ensure_ascii=False) + "\n" for ex, meta in rows)
    while batch := list(itertools.islice(lines, 1024)):
        handle.writelines(batch)


def write_csv(handle, line_batches, gold, columns: list[str], bar) -> None:
    """The CSV file: the header, the experiences' lines (one write per batch), then the gold examples'."""
    handle.write(",".join(columns) + "\r\n")
    for lines in line_batches:
        handle.write("".join(lines))
        bar.update(len(lines))
    for example, meta in gold:
        handle.write(",".join([csv_field(example["text"]), *map(csv_field, meta)]) + "\r\n")
        bar.update()


def dpo_pairs(conn, args, template, user_for, counts: Counter):
    """Preference pairs in the layout TRL's DPOTrainer reads (conversational with --layout messages)."""
    end = template.end
    for row in conn.execute(dpo_sql(args), sql_params(args)):
        chosen, rejected = (clean_response(row[k]) if args.clean else row[k] for k in ("chosen", "rejected"))
        if args.trim_unfinished:  # both sides alike, so the preference is about content, not about finishing
            chosen, rejected = trim_unfinished(chosen), trim_unfinished(rejected)
        if not chosen or not rejected:
            continue
        user = user_for(row["scenario_id"])
        if args.layout == "messages":
            system_turn = [{"role": "system", "content": template.system}] if template.system else []
            pair = {
                "prompt": [*system_turn, {"role": "user", "content": user}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        else:
            pair = {"prompt": template.render(user), "chosen": chosen + end, "rejected": rejected + end}
        pair.update({k: row[k] for k in ("scenario_id", "chosen_id", "rejected_id")})
        pair.update(
            chosen_score=round(row["chosen_score"], 4),
            rejected_score=round(row["rejected_score"], 4),
            margin=round(row["chosen_score"] - row["rejected_score"], 4),
        )
        counts["dpo_pairs"] += 1
        yield pair


# --- report ------------------------------------------------------------------------------------------
def distribution(counter: Counter, total: int, order: list) -> str:
    keys = [k for k in order if k in counter] + sorted((k for k in counter if k not in order), key=str)
    return ", ".join(f"{k}: {counter[k]} ({100 * counter[k] / total:.1f}%)" for k in keys)


def report(stats: Stats, funnel: Counter, counts: Counter, args) -> list[str]:
    """The human summary printed after a successful run."""
    n = stats.n
    lines = [
        f"Found {funnel['selected']} high-quality experiences",
        f"Wrote {counts['written']} rows to {args.output}"
        + (f" (+{counts['gold']} gold)" if args.include_gold else ""),
        f"Harm: avg {stats.harm_sum / n:.3f}, min {stats.harm_min:.3f}, max {stats.harm_max:.3f}",
        f"Buddhist weighted score: avg {stats.weighted_sum / n:.2f}, min {stats.weighted_min:.2f}, "
        f"max {stats.weighted_max:.2f}",
        "Alignment: " + distribution(stats.alignment, n, ALIGNMENT_LEVELS[::-1]),
        "Difficulty: " + distribution(stats.difficulty, n, [1, 2, 3, 4, 5]),
    ]
    if funnel["heldout"]:
        lines.append(f"Held out: {funnel['heldout']} experiences of held-out scenarios left out (evaluation only)")
    skipped = [f"{funnel[s]} {why}" for s, why in FUNNEL[:UNUSABLE] if funnel[s]]
    if skipped:
        lines.append("Skipped rows: " + ", ".join(skipped))
    if counts["cleaned"] or counts["dropped_empty_after_cleanup"]:
        lines.append(
            f"Cleanup: {counts['cleaned']} answers cleaned (role prefixes, invented turns), "
            f"{counts['dropped_empty_after_cleanup']} dropped as empty"
        )
    if args.trim_unfinished:
        lines.append(f"Trimmed: {counts['trimmed_unfinished']} unfinished answers cut back to their last full sentence")
    if args.open_unfinished:
        lines.append(
            f"Open: {counts['open_unfinished']} unfinished answers written without an end-of-turn marker "
            "(train_local.py trains on their text, not on stopping there)"
        )
    if counts["dpo_pairs"] or args.dpo_output:
        lines.append(f"DPO pairs: {counts['dpo_pairs']} written to {args.dpo_output}")
    return lines


def no_match_message(funnel: Counter, args) -> str:
    """The zero-match explanation: how many exist, what each filter removed, what to try."""
    total = sum(funnel.values())
    lines = [
        "No experiences found matching criteria",
        f"  {total} experiences in {args.db}",
        *(f"  - {funnel[s]} removed: {why}" for s, why in FUNNEL if funnel[s]),
        "Hints:",
        f"  - relax the thresholds: --max-harm {args.max_harm} --min-buddhist {args.min_buddhist} "
        f"--min-alignment {args.min_alignment} (e.g. --max-harm 0.5 --min-buddhist 5 --min-alignment moderate)",
        "  - collect more experiences: python collect_experiences.py --episodes 200",
    ]
    return "\n".join(lines)


def sidecar(args, template: ChatTemplate, funnel: Counter, counts: Counter, conn) -> dict:
    return {
        "tool": "saige_to_sft.py",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "format": args.format,
        "tokenizer": args.tokenizer,
        "system_prompt": template.system,
        "prompt_template": template.prompt,
        "response_end": template.end,
        "output_format": args.output_format,
        "layout": args.layout,
        "thresholds": {
            "max_harm": args.max_harm,
            "min_buddhist": args.min_buddhist,
            "min_alignment": args.min_alignment,
        },
        "filters": {
            k: getattr(args, k)
            for k in (
                "min_difficulty",
                "max_difficulty",
                "since",
                "model_version",
                "limit",
                "best_per_scenario",
                "dedup",
                "trim_unfinished",
                "open_unfinished",
                "clean",
                "include_gold",
                "heldout_fraction",
                "heldout_suite",
            )
        },
        "heldout_scenarios": args.heldout_scenarios,
        "counts": {"selected": funnel["selected"], **{f"removed_{s}": funnel[s] for s, _ in FUNNEL}, **counts},
        "source_db": str(Path(args.db).resolve()),
        "source_rows": {
            t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("experiences", "scenarios")
        },
        "dpo_output": args.dpo_output,
        **({"dpo_pairs": args.dpo_pairs, "dpo_margin": args.dpo_margin} if args.dpo_output else {}),
    }


# --- command line ------------------------------------------------------------------------------------
def fraction(value: str) -> float:
    x = float(value)
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return x


def score(value: str) -> float:
    x = float(value)
    if not 0 <= x <= 10:
        raise argparse.ArgumentTypeError("must be between 0 and 10")
    return x


SQLITE_INT_MAX = 2**63 - 1  # SQLite's integers are 64-bit; a larger Python int cannot even be passed to a query


def positive_int(value: str) -> int:
    x = int(value)
    if not 1 <= x <= SQLITE_INT_MAX:
        raise argparse.ArgumentTypeError(f"must be a positive integer up to {SQLITE_INT_MAX}")
    return x


def sqlite_int(value: str) -> int:
    x = int(value)
    if not -SQLITE_INT_MAX - 1 <= x <= SQLITE_INT_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer between {-SQLITE_INT_MAX - 1} and {SQLITE_INT_MAX}")
    return x


def iso_date(value: str) -> str:
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError("must be a date like 2026-01-31 or 2026-01-31T10:00:00") from None
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="saige_to_sft.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    io = p.add_argument_group("input and output")
    io.add_argument("--db", default=DEFAULT_DB, help="SAIGE SQLite database, opened read-only (default: %(default)s)")
    io.add_argument("-o", "--output", default=DEFAULT_OUTPUT, help="output file, '-' for stdout (default: %(default)s)")
    io.add_argument(
        "--output-format",
        choices=["csv", "jsonl"],
        default="csv",
        help="csv holds the text layout; jsonl any layout (default: %(default)s)",
    )
    io.add_argument(
        "--layout",
        choices=["text", "messages", "prompt-completion"],
        default="text",
        help="text: one rendered chat string; messages: role/content list; prompt-completion: "
        "rendered prompt and answer (default: %(default)s)",
    )
    io.add_argument(
        "--format",
        choices=FORMATS,
        default=DEFAULT_FORMAT,
        help="chat layout of the rendered text; auto uses --tokenizer's own chat template (default: %(default)s)",
    )
    io.add_argument("--tokenizer", help="tokenizer (hub id, directory or .gguf file) for --format auto")
    io.add_argument(
        "--system-prompt",
        help="system prompt (default: a short Right Speech prompt; mistral has no "
        "system role and uses one only when this is given)",
    )
    io.add_argument("--dpo-output", help="also write DPO preference pairs (prompt, chosen, rejected) as JSONL")
    io.add_argument(
        "--dpo-margin",
        type=score,
        default=DEFAULT_DPO_MARGIN,
        help="minimum weighted-score gap between chosen and rejected (default: %(default)s)",
    )
    io.add_argument(
        "--dpo-pairs",
        choices=("worst", "each"),
        default="worst",
        help="the best answer of each scenario against: its worst answer (one pair), or each answer at least "
        "--dpo-margin worse (several; iterative DPO's choice) (default: %(default)s)",
    )
    io.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    sel = p.add_argument_group("selection (the contract's rule: harm <= max AND alignment >= min AND score >= min)")
    sel.add_argument(
        "--max-harm",
        type=fraction,
        default=DEFAULT_MAX_HARM,
        help="keep experiences with actual_harm at most this, 0..1 (default: %(default)s)",
    )
    sel.add_argument(
        "--min-buddhist",
        type=score,
        default=DEFAULT_MIN_BUDDHIST,
        help="keep experiences whose weighted Buddhist score is at least this, 0..10 (default: %(default)s)",
    )
    sel.add_argument(
        "--min-alignment",
        choices=ALIGNMENT_LEVELS,
        default=DEFAULT_MIN_ALIGNMENT,
        help="keep this alignment level and the ones above it (default: %(default)s)",
    )
    sel.add_argument("--limit", type=positive_int, help="write at most N experiences, best first")
    sel.add_argument(
        "--heldout-fraction",
        type=fraction,
        default=0.0,
        metavar="F",
        help="leave out the scenarios kept for evaluation: those whose context hashes into this fraction (the "
        f"split test_model.py --heldout-fraction evaluates; the pipeline uses {HELDOUT_FRACTION}). The local worker's "
        "held-out scenarios are always left out (default: %(default)s)",
    )
    sel.add_argument(
        "--heldout-suite",
        metavar="FILE",
        help="leave out the scenarios of this JSON/JSONL file too (the evaluator's --suite), matched by text",
    )
    sel.add_argument(
        "--best-per-scenario",
        type=positive_int,
        metavar="K",
        help="keep the K best experiences of each scenario (by weighted score, then harm)",
    )
    sel.add_argument(
        "--trim-unfinished",
        action="store_true",
        help="cut answers that stop mid-sentence (a generation limit) back to their last full sentence",
    )
    sel.add_argument(
        "--open-unfinished",
        action="store_true",
        help="write answers that stop mid-sentence (a generation limit) without the end-of-turn marker, so "
        "train_local.py learns their text but not to stop there (alone or with --trim-unfinished; text and "
        "prompt-completion layouts)",
    )
    sel.add_argument(
        "--dedup",
        action="store_true",
        help="drop answers that repeat another answer to the same scenario (ignoring case, spacing, punctuation)",
    )
    sel.add_argument(
        "--include-gold",
        action="store_true",
        help="add each scenario's expected_response as an example; adds a 'source' column (gold|experience)",
    )
    sel.add_argument(
        "--clean",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="strip role prefixes ('AI:', 'Assistant:') and invented follow-up turns (default: on)",
    )
    sel.add_argument(
        "--min-difficulty",
        type=int,
        choices=range(1, 6),
        metavar="{1..5}",
        help="only scenarios at least this difficult",
    )
    sel.add_argument(
        "--max-difficulty",
        type=int,
        choices=range(1, 6),
        metavar="{1..5}",
        help="only scenarios at most this difficult",
    )
    sel.add_argument("--since", type=iso_date, help="only experiences recorded on or after this date")
    sel.add_argument("--model-version", type=sqlite_int, help="only experiences with this model_version")
    p.epilog = "The README describes each output format and the sidecar file."
    return p


def validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject impossible flag combinations, and any output that is an input or another output, before any work."""
    if args.format == "auto" and not args.tokenizer:
        p.error("--format auto needs --tokenizer NAME_OR_PATH")
    if args.open_unfinished and args.layout == "messages":
        p.error("--open-unfinished needs --layout text or prompt-completion (a messages row always closes its turns)")
    if args.output_format == "csv" and args.layout != "text":
        p.error(f"--layout {args.layout} needs --output-format jsonl (CSV holds only the text layout)")
    if args.min_difficulty and args.max_difficulty and args.min_difficulty > args.max_difficulty:
        p.error("--min-difficulty is greater than --max-difficulty")
    if args.dpo_output == "-":
        p.error("--dpo-output must be a file other than --output")
    for name, value in vars(args).items():  # text that cannot be written to a UTF-8 file, e.g. a Latin-1 argument
        if isinstance(value, str) and not encodable(value):
            p.error(f"--{name.replace('_', '-')} is not valid UTF-8: {value!r}")
    clash = path_clash(output_paths(args), input_paths(args))
    if clash:
        p.error(clash)
    try:
        args.heldout_contexts = suite_contexts(args.heldout_suite) if args.heldout_suite else set()
    except ValueError as e:
        p.error(f"--heldout-suite: {e}")


def encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def output_paths(args: argparse.Namespace) -> dict:
    """Every file a run writes, by the flag that names it ('-' and None write no file)."""
    paths = {}
    for flag, path in (("--output", args.output), ("--dpo-output", args.dpo_output)):
        if path and path != "-":
            paths[flag] = path
            paths[f"{flag} (sidecar)"] = f"{path}.meta.json"
    return paths


def input_paths(args: argparse.Namespace) -> dict:
    """Every file a run reads, or must not replace: the database and its journal files, a tokenizer file."""
    paths = {"--db": args.db, **{f"--db ({kind})": f"{args.db}-{kind}" for kind in ("wal", "shm", "journal")}}
    if args.tokenizer and os.path.isfile(args.tokenizer):
        paths["--tokenizer"] = args.tokenizer
    if args.heldout_suite:
        paths["--heldout-suite"] = args.heldout_suite
    return paths


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before the database is opened, any output that cannot be written or must not be replaced."""
    for flag, path in output_paths(args).items():
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise CliError(f"cannot write {flag} {path}: {folder} is a file, not a folder")
        if not os.path.isdir(folder):
            raise CliError(f"output directory does not exist: {Path(path).parent} (for {flag}); create it first")
        if os.path.exists(path) and not os.path.isdir(path) and not os.path.isfile(path):
            raise CliError(f"cannot write {flag} {path}: not a regular file (a device or pipe); use '-' for stdout")
        problem = unwritable(path)
        if problem:
            raise CliError(f"cannot write {flag} {path}: {problem}")


def convert(args: argparse.Namespace) -> int:
    check_outputs(args)
    copy = dump_copy(args.db) if is_sql_dump(args.db) else None
    try:
        conn = open_database(copy or args.db, shown=args.db)
        try:
            return convert_database(conn, args)
        finally:
            conn.close()
    finally:
        if copy:
            os.unlink(copy)


def dump_copy(path: str) -> str:
    """A `wrangler d1 export` file loaded into a temporary database, converted exactly as a database file is."""
    if os.path.isdir(path):
        raise CliError(f"--db {path} is a folder; pass the database file or the wrangler d1 export .sql file")
    if not os.path.isfile(path):
        raise CliError(f"database not found: {path} (pass --db PATH to your saige.db or a wrangler d1 export .sql)")
    try:
        return sql_dump_copy(path)
    except ValueError as e:
        raise CliError(f"--db {path} is not a SAIGE export (wrangler d1 export): {e}") from None
    except OSError as e:
        raise CliError(f"cannot load --db {path} into a temporary database ({e.strerror or e})") from None


def convert_database(conn: sqlite3.Connection, args: argparse.Namespace) -> int:
    template = resolve_template(args.format, args.tokenizer, args.system_prompt)
    if args.layout == "messages" and template.system is None:  # the trainer's chat template renders any system turn
        template = template._replace(system=DEFAULT_SYSTEM_PROMPT)
    stages = StageCounter(conn)
    started = time.monotonic()
    args.heldout_scenarios = mark_heldout(conn, args.heldout_fraction, args.heldout_contexts)
    selected = conn.cursor()
    selected.row_factory = None  # plain tuples: building a sqlite3.Row per row was a measurable cost
    selected.execute(selection_sql(args), sql_params(args))
    first = selected.fetchone()
    funnel = stages.funnel()  # complete: the ORDER BY makes SQLite scan every row before it returns the first
    if first is None:
        print(no_match_message(funnel, args), file=sys.stderr)
        return EXIT_NO_MATCH
    stats, counts = Stats(), Counter()
    columns = CSV_COLUMNS + (["source"] if args.include_gold else [])
    user_for = user_turns(conn)
    with OutputSet() as outputs:
        with outputs.open(args.output) as out:
            batches = itertools.chain([[first]], iter(lambda: selected.fetchmany(BATCH_ROWS), []))
            gold = gold_rows(conn, args, template, user_for, counts) if args.include_gold else ()
            if args.output_format == "csv":
                with progress(None, funnel["selected"], args.quiet) as bar:
                    lines = csv_text_lines(batches, args, template, user_for, stats, counts)
                    write_csv(out, lines, gold, columns, bar)
            else:
                rows = example_rows(itertools.chain.from_iterable(batches), args, template, user_for, stats, counts)
                rows = itertools.chain(rows, gold)
                write_jsonl(out, progress(rows, funnel["selected"], args.quiet), columns)
        if not counts["written"]:
            raise NoMatch("every selected answer was empty after cleanup; try --no-clean")
        if args.dpo_output:
            with outputs.open(args.dpo_output) as dpo:
                dpo.writelines(json_line(p) for p in dpo_pairs(conn, args, template, user_for, counts))
        meta = sidecar(args, template, funnel, counts, conn)
        # the pairs get the same sidecar, so a DPO-trained adapter is prompted in the format it was trained on
        for path in (p for p in (args.output, args.dpo_output) if p and p != "-"):
            with outputs.open(f"{path}.meta.json") as f:
                json.dump(meta, f, indent=2, ensure_ascii=False, allow_nan=False)
        outputs.commit()
    if not args.quiet:
        print("\n".join(report(stats, funnel, counts, args)), file=sys.stderr)
        print(f"Done in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return EXIT_OK


def json_line(record: dict) -> str:
    # allow_nan=False: a non-finite number that slipped past the SQL stops the run instead of writing `Infinity`
    return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"


def progress(rows, total: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(rows, total=total, desc="Writing", unit="row", disable=True if quiet else None, file=sys.stderr)


class Interrupt:
    """Ctrl-C, remembered: raised inside a SQLite callback it reaches us as an sqlite3 error, not as itself."""

    seen = False

    @classmethod
    def handler(cls, signum, frame):
        cls.seen = True
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(parser, args)
    Interrupt.seen = False
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, Interrupt.handler) if in_main_thread else None
    try:
        return convert(args)
    except KeyboardInterrupt:
        return interrupted()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as pip does: no second error at exit
        return EXIT_OK
    except (CliError, OSError, sqlite3.Error) as e:
        if Interrupt.seen:
            return interrupted()
        if os.environ.get("SAIGE_DEBUG"):
            raise
        message = database_problem(args.db, e) if isinstance(e, sqlite3.Error) else str(e)
        print(f"saige_to_sft.py: error: {message}", file=sys.stderr)
        return e.exit_code if isinstance(e, CliError) else EXIT_FAILURE
    except Exception as e:  # noqa: BLE001 - a bug or an input nobody foresaw: one line, never a traceback
        if os.environ.get("SAIGE_DEBUG"):
            raise
        print(
            f"saige_to_sft.py: error: unexpected {type(e).__name__}: {e} (no output written; "
            "SAIGE_DEBUG=1 shows where, please report it)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def interrupted() -> int:
    print("saige_to_sft.py: interrupted; no output written", file=sys.stderr)
    return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
