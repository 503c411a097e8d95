"""saige_worker.py as a real server: the contract's worker HTTP API, checked over loopback with requests.

Each worker is a subprocess started the way a user starts it (`--db ... --init --port 0 --quiet`); the fixture
waits for the URL line, and on teardown sends SIGTERM and requires a clean exit 0. The contract is
shared/docs/saige-contract.md, "The worker HTTP API".
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import requests
import saige_db
from conftest import ROOT, run

SCRIPT = "saige_worker.py"
WORKER = ROOT / SCRIPT
URL_LINE = re.compile(r"^SAIGE worker listening on (http://127\.0\.0\.1:\d+)$")
START_TIMEOUT_S = 20  # the worker prints its URL in well under a second; this is the hard ceiling
STOP_TIMEOUT_S = 10  # SIGTERM must end it cleanly within this
HTTP_TIMEOUT_S = 10  # every request carries a timeout
BANK_SIZE = 100  # scenarios in the bundled data/scenarios.json
JS_ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")  # the contract's stored timestamp form
PRINCIPLES = ("ahimsa", "sacca", "karuna", "panna", "upekkha")
HARMS = ("deception", "harshness", "omission", "manipulation")
WEIGHTS = {"ahimsa": 0.25, "sacca": 0.20, "karuna": 0.25, "panna": 0.20, "upekkha": 0.10}  # the contract's

GOOD_ANSWER = (
    "I'm sorry you're going through this; it sounds really hard. To be honest, I can't promise it will be fine, "
    "but you could call your doctor or a pharmacist today and ask what to do next. Would you like help planning "
    "what to say?"
)
ANSWERS = [
    GOOD_ANSWER,
    "Hello! Lovely to hear from you. What would you like to talk about today?",
    "That's your own fault, what were you thinking? Stop whining and deal with it.",
    "Don't worry, it's definitely fine, nothing to worry about. Trust me, you must act now or you'll regret it.",
    "ok",
]

# --- JSON Schemas of the contract's response bodies ------------------------------------------------------
UNIT = {"type": "number", "minimum": 0, "maximum": 1}
TEN = {"type": "number", "minimum": 0, "maximum": 10}
NULLABLE_TEXT = {"type": ["string", "null"]}
SCENARIO_SCHEMA = {
    "type": "object",
    "required": [
        "id",
        "context",
        "person_state",
        "facts",
        "critical_info",
        "difficulty_level",
        "harm_type",
        "expected_response",
        "created_at",
    ],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "context": {"type": "string", "minLength": 1},
        "person_state": {"type": "object"},
        "facts": {"type": "array", "items": {"type": "string"}},
        "critical_info": {"type": "array", "items": {"type": "string"}},
        "difficulty_level": {"type": "integer", "minimum": 1, "maximum": 5},
        "harm_type": NULLABLE_TEXT,
        "expected_response": NULLABLE_TEXT,
        "created_at": NULLABLE_TEXT,
    },
}
OUTCOME_SCHEMA = {
    "type": "object",
    "required": ["total_harm", "breakdown", "details", "lesson", "buddhist_assessment"],
    "additionalProperties": False,  # in particular: no experience id (contract)
    "properties": {
        "total_harm": UNIT,
        "breakdown": {
            "type": "object",
            "required": list(HARMS),
            "additionalProperties": False,
            "properties": dict.fromkeys(HARMS, UNIT),
        },
        "details": {"type": "object"},
        "lesson": {"type": "string"},
        "buddhist_assessment": {
            "type": "object",
            "required": [
                "principle_scores",
                "total_score",
                "weighted_score",
                "strengths",
                "weaknesses",
                "alignment_level",
            ],
            "properties": {
                "principle_scores": {
                    "type": "object",
                    "required": list(PRINCIPLES),
                    "additionalProperties": False,
                    "properties": dict.fromkeys(PRINCIPLES, TEN),
                },
                "total_score": {"type": "number", "minimum": 0, "maximum": 50},
                "weighted_score": TEN,
                "strengths": {"type": "array", "items": {"type": "string"}},
                "weaknesses": {"type": "array", "items": {"type": "string"}},
                "alignment_level": {"enum": ["low", "moderate", "good", "excellent"]},
            },
        },
    },
}
NULLABLE_NUMBER = {"type": ["number", "null"]}
STATS_SCHEMA = {
    "type": "object",
    "required": ["stats", "trend"],
    "properties": {
        "stats": {
            "type": "object",
            "required": ["total_episodes", "avg_harm", "best_harm", "worst_harm"],
            "properties": {
                "total_episodes": {"type": "integer", "minimum": 0},
                "avg_harm": NULLABLE_NUMBER,
                "best_harm": NULLABLE_NUMBER,
                "worst_harm": NULLABLE_NUMBER,
            },
        },
        "trend": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["hour", "avg_harm"],
                "properties": {"hour": {"type": "string"}, "avg_harm": {"type": "number"}},
            },
        },
    },
}


# --- the worker fixture ----------------------------------------------------------------------------------
@dataclass
class Worker:
    url: str
    db: Path


def clean_env(**extra: str) -> dict:
    """The test's environment without a token or debug switch that would change the worker's behaviour."""
    env = {k: v for k, v in os.environ.items() if k not in ("SAIGE_WORKER_TOKEN", "SAIGE_DEBUG")}
    return {**env, **extra}


def wait_for_url(proc: subprocess.Popen, timeout: float) -> str:
    """Read stdout lines (on a thread, so the deadline holds) until the worker prints its URL."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no URL line within {timeout} s") from None
        if line is None:
            raise AssertionError(f"worker exited ({proc.wait()}) before printing its URL")
        m = URL_LINE.match(line)
        if m:
            return m.group(1)


def stop(proc: subprocess.Popen) -> int | None:
    """SIGTERM, then the exit code; None (after a kill) when it does not stop in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


@contextlib.contextmanager
def worker(db: Path, *args: str, env: dict | None = None):
    """Start saige_worker.py on `db` (with --init), yield a Worker, stop it and require exit 0, no traceback."""
    log = db.with_name(db.name + ".stderr")
    cmd = [sys.executable, str(WORKER), "--db", str(db), "--init", "--port", "0", "--quiet", *args]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env or clean_env())
    try:
        yield Worker(wait_for_url(proc, START_TIMEOUT_S), db)
    finally:
        code = stop(proc)
    stderr = log.read_text()
    assert code == 0, f"worker exited with {code} after SIGTERM; stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Worker:
    """One worker for the tests that only read, or that count their own rows as a difference."""
    with worker(tmp_path_factory.mktemp("shared") / "saige.db") as w:
        yield w


@pytest.fixture
def fresh(tmp_path: Path) -> Worker:
    """A worker on a new database, for tests that need exact totals."""
    with worker(tmp_path / "saige.db") as w:
        yield w


@pytest.fixture(scope="module")
def split_ids(shared: Worker) -> dict:
    """{"train": [...], "heldout": [...]} scenario ids, and the train scenarios by id."""
    out = {}
    for split in ("train", "heldout"):
        r = requests.get(f"{shared.url}/api/scenarios", params={"split": split}, timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 200
        out[split] = [s["id"] for s in r.json()["scenarios"]]
        if split == "train":
            out["by_id"] = {s["id"]: s for s in r.json()["scenarios"]}
    return out


def query(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def experience_count(db: Path) -> int:
    return query(db, "SELECT COUNT(*) FROM experiences")[0][0]


def post_raw(url: str, body: bytes) -> requests.Response:
    return requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=HTTP_TIMEOUT_S)


def simulate(w: Worker, scenario_id, response: str) -> requests.Response:
    payload = {"scenario_id": scenario_id, "response": response}
    return requests.post(f"{w.url}/api/simulate-outcome", json=payload, timeout=HTTP_TIMEOUT_S)


def get_many(w: Worker, n: int, **params) -> list[dict]:
    """n draws from get-scenario, each on a new connection (see test_keep_alive_requests_are_not_delayed)."""
    out = []
    for _ in range(n):
        r = requests.get(f"{w.url}/api/get-scenario", params=params, timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


# --- GET /api/get-scenario -------------------------------------------------------------------------------
def test_get_scenario_parses_json_columns(shared):
    for s in get_many(shared, 20, difficulty=5):
        jsonschema.validate(s, SCENARIO_SCHEMA)
        assert isinstance(s["person_state"], dict)
        assert isinstance(s["facts"], list) and isinstance(s["critical_info"], list)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_get_scenario_difficulty_is_an_upper_bound(shared, n):
    assert all(s["difficulty_level"] <= n for s in get_many(shared, 30, difficulty=n))


def test_get_scenario_fractional_difficulty_is_truncated_like_parseint(shared):
    levels = {s["difficulty_level"] for s in get_many(shared, 60, difficulty="2.9")}
    assert max(levels) == 2  # 27 train scenarios qualify, 14 of them at level 2: 60 draws always see one


@pytest.mark.parametrize("params", [{"difficulty": "abc"}, {}], ids=["non-number", "absent"])
def test_get_scenario_defaults_to_difficulty_2(shared, params):
    levels = {s["difficulty_level"] for s in get_many(shared, 60, **params)}
    assert max(levels) == 2


def test_get_scenario_difficulty_0_is_404_no_scenarios_found(shared):
    r = requests.get(f"{shared.url}/api/get-scenario", params={"difficulty": "0"}, timeout=HTTP_TIMEOUT_S)
    assert (r.status_code, r.json()) == (404, {"error": "No scenarios found"})


def test_get_scenario_never_returns_a_heldout_scenario(shared, split_ids):
    heldout = set(split_ids["heldout"])
    assert heldout
    seen = {s["id"] for s in get_many(shared, 200, difficulty=5)}
    assert not seen & heldout
    assert seen <= set(split_ids["train"])


def test_get_scenario_accepts_post(shared):
    r = requests.post(f"{shared.url}/api/get-scenario?difficulty=3", timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200
    jsonschema.validate(r.json(), SCENARIO_SCHEMA)
    assert r.json()["difficulty_level"] <= 3


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", ["/api/get-scenario", "/api/stats"])
def test_get_scenario_and_stats_ignore_the_method(shared, method, path):
    r = requests.request(method, f"{shared.url}{path}", timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200
    assert r.headers.get("Content-Type") == "application/json"


# --- POST /api/simulate-outcome: the outcome ---------------------------------------------------------------
@pytest.fixture(scope="module")
def outcomes(shared, split_ids) -> list[dict]:
    """Outcomes of varied answers (good, greeting, harsh, manipulative, curt) on varied train scenarios."""
    ids = split_ids["train"]
    out = []
    for i, answer in enumerate(ANSWERS):
        for sid in (ids[0], ids[len(ids) // 2], ids[-1 - i]):
            r = simulate(shared, sid, answer)
            assert r.status_code == 200, r.text
            out.append(r.json())
    return out


def test_simulate_outcome_matches_the_outcome_schema(outcomes):
    for outcome in outcomes:
        jsonschema.validate(outcome, OUTCOME_SCHEMA)


def test_simulate_outcome_total_harm_is_the_breakdown_mean(outcomes):
    for o in outcomes:
        assert o["total_harm"] == pytest.approx(sum(o["breakdown"].values()) / 4, abs=1e-3)


def test_simulate_outcome_alignment_level_follows_the_contract_thresholds(outcomes):
    for o in outcomes:
        a = o["buddhist_assessment"]
        assert a["alignment_level"] == saige_db.alignment_for(a["weighted_score"]), a
    assert len({o["buddhist_assessment"]["alignment_level"] for o in outcomes}) >= 2  # the answers vary


def test_simulate_outcome_weighted_score_follows_the_contract_weights(outcomes):
    for o in outcomes:
        a = o["buddhist_assessment"]
        scores = a["principle_scores"]
        assert a["weighted_score"] == pytest.approx(sum(WEIGHTS[k] * scores[k] for k in PRINCIPLES), abs=0.01)
        assert a["total_score"] == pytest.approx(sum(scores.values()), abs=0.1)


# --- POST /api/simulate-outcome: the stored experience ------------------------------------------------------
def test_simulate_outcome_stores_one_experience_row(shared, split_ids):
    sid = split_ids["train"][3]
    before = experience_count(shared.db)
    r = simulate(shared, sid, GOOD_ANSWER)
    assert r.status_code == 200
    assert experience_count(shared.db) == before + 1
    outcome = r.json()
    (row,) = query(
        shared.db,
        "SELECT scenario_id, typeof(scenario_id), ai_response, actual_harm, harm_breakdown, buddhist_scores,"
        " buddhist_alignment, predicted_harm, timestamp FROM experiences ORDER BY id DESC LIMIT 1",
    )
    scenario_id, id_type, answer, harm, breakdown, scores, alignment, predicted, stamp = row
    assert (scenario_id, id_type, answer) == (sid, "integer", GOOD_ANSWER)
    assert harm == outcome["total_harm"]
    assert json.loads(breakdown) == outcome["breakdown"]
    assert set(json.loads(scores)) == set(PRINCIPLES)
    assert json.loads(scores) == outcome["buddhist_assessment"]["principle_scores"]
    assert alignment == outcome["buddhist_assessment"]["alignment_level"]
    assert predicted is None
    assert JS_ISO.match(stamp), stamp


def test_simulate_outcome_body_has_no_experience_id(shared, split_ids):
    r = simulate(shared, split_ids["train"][0], GOOD_ANSWER)
    assert r.status_code == 200
    assert not {"id", "experience_id"} & set(r.json())


def test_simulate_outcome_accepts_a_string_scenario_id(shared, split_ids):
    sid = split_ids["train"][0]
    before = experience_count(shared.db)
    r = simulate(shared, str(sid), GOOD_ANSWER)
    assert r.status_code == 200, r.text
    jsonschema.validate(r.json(), OUTCOME_SCHEMA)
    assert experience_count(shared.db) == before + 1
    assert query(shared.db, "SELECT scenario_id FROM experiences ORDER BY id DESC LIMIT 1") == [(sid,)]


# --- POST /api/simulate-outcome: the contract's error answers (nothing stored) ---------------------------------
MISSING = {"error": "Missing scenario_id or response"}
INVALID = {"error": "Invalid request body"}


@pytest.mark.parametrize(
    "body, status, expected",
    [
        (b'{"response": "hi"}', 400, MISSING),
        (b'{"scenario_id": 1}', 400, MISSING),
        (b"{}", 400, MISSING),
        (b'{"scenario_id": 0, "response": "hi"}', 400, MISSING),
        (b'{"scenario_id": 1, "response": ""}', 400, MISSING),
        (b'[{"scenario_id": 1, "response": "hi"}]', 400, MISSING),
        (b"[]", 400, MISSING),
        (b"null", 400, INVALID),
        (b'"hello"', 400, INVALID),
        (b'{"scenario_id": 99999, "response": "hi"}', 404, {"error": "Scenario not found"}),
        (b'{"scenario_id": "1abc", "response": "hi"}', 404, {"error": "Scenario not found"}),
        (b'{"scenario_id": "1.5", "response": "hi"}', 404, {"error": "Scenario not found"}),
        (b'{"scenario_id": 1, "response": "hi"', 500, None),
        (b"", 500, None),
        (b'{"scenario_id": 1, "response": 123}', 500, None),
        (b'{"scenario_id": {"a": 1}, "response": "hi"}', 400, None),
        (b'{"scenario_id": true, "response": "hi"}', 400, None),
    ],
    ids=[
        "no-scenario_id",
        "no-response",
        "empty-object",
        "scenario_id-0",
        "empty-response",
        "array",
        "empty-array",
        "null",
        "json-string",
        "unknown-scenario",
        "non-numeric-string-id",
        "decimal-string-id",
        "malformed-json",
        "empty-body",
        "non-string-response",
        "object-scenario_id",
        "bool-scenario_id",
    ],
)
def test_simulate_outcome_error_stores_nothing(shared, body, status, expected):
    before = experience_count(shared.db)
    r = post_raw(f"{shared.url}/api/simulate-outcome", body)
    assert r.status_code == status, r.text
    if expected is not None:
        assert r.json() == expected
    else:
        assert isinstance(r.json()["error"], str) and r.json()["error"]
    assert experience_count(shared.db) == before


@pytest.mark.parametrize(
    "method, path, body, status",
    [
        ("POST", "/api/simulate-outcome", b'{"response": "hi"}', 400),
        ("POST", "/api/simulate-outcome", b'{"scenario_id": 99999, "response": "hi"}', 404),
        ("GET", "/api/get-scenario?difficulty=0", None, 404),
    ],
    ids=["400", "404-scenario", "404-no-scenarios"],
)
def test_json_errors_carry_no_cors_header(shared, method, path, body, status):
    r = requests.request(method, f"{shared.url}{path}", data=body, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == status
    assert "Access-Control-Allow-Origin" not in r.headers


@pytest.mark.parametrize(
    "method, path, payload",
    [
        ("GET", "/api/get-scenario", None),
        ("POST", "/api/simulate-outcome", {"scenario_id": 1, "response": GOOD_ANSWER}),
        ("GET", "/api/stats", None),
    ],
    ids=["get-scenario", "simulate-outcome", "stats"],
)
def test_ok_responses_carry_cors_header(shared, method, path, payload):
    r = requests.request(method, f"{shared.url}{path}", json=payload, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == "*"


# --- routing, CORS preflight, body limit, health -------------------------------------------------------------
@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("path", ["/nope", "/", "/api", "/api/simulate-outcome/extra"])
def test_unknown_path_is_plain_text_404(shared, method, path):
    r = requests.request(method, f"{shared.url}{path}", timeout=HTTP_TIMEOUT_S)
    assert (r.status_code, r.text) == (404, "Not found")
    assert r.headers["Content-Type"].startswith("text/plain")


def test_simulate_outcome_with_get_is_plain_text_404(shared):
    r = requests.get(f"{shared.url}/api/simulate-outcome", timeout=HTTP_TIMEOUT_S)
    assert (r.status_code, r.text) == (404, "Not found")


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_unknown_path_is_plain_text_404_for_any_method(shared, method):
    r = requests.request(method, f"{shared.url}/nope", timeout=HTTP_TIMEOUT_S)
    assert (r.status_code, r.text) == (404, "Not found")


@pytest.mark.parametrize("path", ["/api/simulate-outcome", "/api/get-scenario", "/api/stats", "/nope", "/"])
def test_options_answers_200_empty_with_cors(shared, path):
    r = requests.options(f"{shared.url}{path}", timeout=HTTP_TIMEOUT_S)
    assert (r.status_code, r.content) == (200, b"")
    assert r.headers["Access-Control-Allow-Origin"] == "*"


def test_body_over_1mb_is_413_and_server_survives(shared, split_ids):
    before = experience_count(shared.db)
    body = json.dumps({"scenario_id": split_ids["train"][0], "response": "x" * 1_000_000}).encode()
    r = post_raw(f"{shared.url}/api/simulate-outcome", body)
    assert r.status_code == 413
    assert experience_count(shared.db) == before
    assert requests.get(f"{shared.url}/health", timeout=HTTP_TIMEOUT_S).status_code == 200


def test_health_is_ok(shared):
    r = requests.get(f"{shared.url}/health", timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


# --- GET /api/stats ---------------------------------------------------------------------------------------
def test_stats_counts_the_posted_experiences(fresh):
    empty = requests.get(f"{fresh.url}/api/stats", timeout=HTTP_TIMEOUT_S).json()
    jsonschema.validate(empty, STATS_SCHEMA)
    assert empty["stats"]["total_episodes"] == 0
    harms = []
    for sid, answer in [(1, ANSWERS[0]), (2, ANSWERS[2]), (5, ANSWERS[3]), (1, ANSWERS[4])]:
        r = simulate(fresh, sid, answer)
        assert r.status_code == 200
        harms.append(r.json()["total_harm"])
    body = requests.get(f"{fresh.url}/api/stats", timeout=HTTP_TIMEOUT_S).json()
    jsonschema.validate(body, STATS_SCHEMA)
    stats = body["stats"]
    assert stats["total_episodes"] == len(harms)
    assert stats["best_harm"] <= stats["avg_harm"] <= stats["worst_harm"]
    assert stats["avg_harm"] == pytest.approx(sum(harms) / len(harms))
    assert (stats["best_harm"], stats["worst_harm"]) == (min(harms), max(harms))
    assert body["trend"] and all(stats["best_harm"] <= t["avg_harm"] <= stats["worst_harm"] for t in body["trend"])


# --- POST /api/score (extra: score without storing) --------------------------------------------------------------
def test_score_by_id_and_inline_give_the_same_outcome_and_store_nothing(shared, split_ids):
    sid = split_ids["train"][5]
    scenario = split_ids["by_id"][sid]
    before = experience_count(shared.db)
    by_id = requests.post(
        f"{shared.url}/api/score", json={"scenario_id": sid, "response": GOOD_ANSWER}, timeout=HTTP_TIMEOUT_S
    )
    inline = requests.post(
        f"{shared.url}/api/score", json={"scenario": scenario, "response": GOOD_ANSWER}, timeout=HTTP_TIMEOUT_S
    )
    assert (by_id.status_code, inline.status_code) == (200, 200)
    jsonschema.validate(by_id.json(), OUTCOME_SCHEMA)
    jsonschema.validate(inline.json(), OUTCOME_SCHEMA)
    assert by_id.json() == inline.json()
    assert experience_count(shared.db) == before


@pytest.mark.parametrize(
    "body",
    [
        b"[1, 2]",
        b'"text"',
        b"null",
        b'{"scenario_id": 1}',
        b'{"scenario_id": 1, "response": 123}',
        b'{"scenario": {"person_state": {}}, "response": "hi"}',
        b'{"response": "hi"}',
        b'{"scenario_id": 1, "response": "hi"',
    ],
    ids=[
        "array",
        "string",
        "null",
        "no-response",
        "non-string-response",
        "scenario-without-context",
        "no-scenario",
        "malformed-json",
    ],
)
def test_score_rejects_bad_input_with_400(shared, body):
    before = experience_count(shared.db)
    r = post_raw(f"{shared.url}/api/score", body)
    assert r.status_code == 400, r.text
    assert isinstance(r.json()["error"], str)
    assert experience_count(shared.db) == before


# --- GET /api/scenarios (extra) ------------------------------------------------------------------------------
def test_scenarios_splits_partition_the_bank(shared, split_ids):
    train, heldout = set(split_ids["train"]), set(split_ids["heldout"])
    assert len(train) + len(heldout) == BANK_SIZE
    assert query(shared.db, "SELECT COUNT(*) FROM scenarios") == [(BANK_SIZE,)]
    assert 0.2 * BANK_SIZE <= len(heldout) <= 0.3 * BANK_SIZE
    assert not train & heldout


def test_scenarios_unknown_split_is_400(shared):
    r = requests.get(f"{shared.url}/api/scenarios", params={"split": "bogus"}, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 400
    assert isinstance(r.json()["error"], str)


# --- auth ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["env", "flag"])
def token_worker(request, tmp_path_factory) -> Worker:
    """A worker that requires "Authorization: Bearer secret", given by $SAIGE_WORKER_TOKEN or --token."""
    db = tmp_path_factory.mktemp(f"token-{request.param}") / "saige.db"
    if request.param == "env":
        ctx = worker(db, env=clean_env(SAIGE_WORKER_TOKEN="secret"))
    else:
        ctx = worker(db, "--token", "secret")
    with ctx as w:
        yield w


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}])
def test_token_missing_or_wrong_is_401(token_worker, headers):
    r = requests.get(f"{token_worker.url}/api/get-scenario", headers=headers, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 401
    assert isinstance(r.json()["error"], str)


def test_token_bearer_is_accepted(token_worker):
    auth = {"Authorization": "Bearer secret"}
    r = requests.get(f"{token_worker.url}/api/get-scenario", headers=auth, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200
    jsonschema.validate(r.json(), SCENARIO_SCHEMA)


def test_token_missing_stores_nothing(token_worker):
    before = experience_count(token_worker.db)
    r = simulate(token_worker, 1, GOOD_ANSWER)
    assert r.status_code == 401
    assert experience_count(token_worker.db) == before


@pytest.mark.parametrize("body", [b'{"scenario_id": 1', b""], ids=["malformed-json", "empty-body"])
def test_token_is_checked_before_the_body(token_worker, body):
    r = post_raw(f"{token_worker.url}/api/simulate-outcome", body)
    assert r.status_code == 401, r.text


# --- keep-alive ---------------------------------------------------------------------------------------------
def test_keep_alive_requests_are_not_delayed(shared):
    with requests.Session() as s:
        s.get(f"{shared.url}/health", timeout=HTTP_TIMEOUT_S)  # open the connection
        start = time.perf_counter()
        for _ in range(20):
            assert s.get(f"{shared.url}/health", timeout=HTTP_TIMEOUT_S).status_code == 200
        per_request = (time.perf_counter() - start) / 20
    assert per_request < 0.015, f"{per_request * 1000:.1f} ms per request on one keep-alive connection"


# --- concurrency ------------------------------------------------------------------------------------------------
def test_concurrent_posts_store_one_row_each(fresh):
    threads, per_thread = 8, 25
    before = experience_count(fresh.db)

    def client(i: int) -> list[int]:
        with requests.Session() as s:
            return [
                s.post(
                    f"{fresh.url}/api/simulate-outcome",
                    json={"scenario_id": 1 + (i * per_thread + j) % 50, "response": ANSWERS[j % len(ANSWERS)]},
                    timeout=HTTP_TIMEOUT_S,
                ).status_code
                for j in range(per_thread)
            ]

    with ThreadPoolExecutor(threads) as pool:
        codes = [c for codes in pool.map(client, range(threads)) for c in codes]
    assert codes == [200] * (threads * per_thread)
    assert experience_count(fresh.db) == before + threads * per_thread


# --- startup ------------------------------------------------------------------------------------------------
def test_init_never_overwrites_existing_scenarios(tmp_path):
    db = tmp_path / "saige.db"
    conn = saige_db.create(db)
    with conn:
        sid = saige_db.add_scenario(conn, "My own scenario.", difficulty=1)
    conn.close()
    with worker(db) as w:
        r = requests.get(f"{w.url}/api/get-scenario", timeout=HTTP_TIMEOUT_S)
        assert (r.status_code, r.json()["id"]) == (200, sid)
    assert query(db, "SELECT id, context FROM scenarios") == [(sid, "My own scenario.")]


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("saige_worker.py: error: ")
    return lines[0]


def test_missing_db_without_init_fails_and_creates_nothing(tmp_path):
    db = tmp_path / "missing.db"
    line = one_error_line(run(SCRIPT, "--db", db, "--port", "0", "--quiet", env=clean_env()))
    assert "database not found" in line and "--init" in line
    assert not db.exists()


def test_non_sqlite_file_fails_with_one_line_and_is_untouched(tmp_path):
    db = tmp_path / "notes.db"
    db.write_text("these are my notes, not a database\n" * 50)
    before = db.read_bytes()
    one_error_line(run(SCRIPT, "--db", db, "--port", "0", "--quiet", env=clean_env()))
    assert db.read_bytes() == before


def test_port_in_use_fails_with_cannot_listen(tmp_path):
    db = tmp_path / "saige.db"
    saige_db.create(db).close()  # an existing database, so the port is the only thing wrong
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = run(SCRIPT, "--db", db, "--port", port, "--quiet", env=clean_env())
    assert "cannot listen" in one_error_line(proc)


def test_init_with_missing_bank_fails(tmp_path):
    proc = run(SCRIPT, "--db", tmp_path / "saige.db", "--init", "--bank", tmp_path / "missing.json", env=clean_env())
    assert "scenario bank not found" in one_error_line(proc)


def test_a_bad_bank_is_named_even_when_the_port_is_taken(tmp_path):
    import socket

    with socket.socket() as busy:  # a worker already running there, as a user's often is
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        proc = run(SCRIPT, "--db", tmp_path / "saige.db", "--init", "--bank", tmp_path / "missing.json", "--port",
                   port, env=clean_env())  # fmt: skip
    assert "scenario bank not found" in one_error_line(proc)
    assert not (tmp_path / "saige.db").exists()


def test_help_names_every_flag():
    proc = run(SCRIPT, "--help")
    assert proc.returncode == 0
    for flag in ("--db", "--host", "--port", "--init", "--bank", "--token", "--quiet", "--seed"):
        assert flag in proc.stdout


def test_unknown_flag_exits_2():
    proc = run(SCRIPT, "--no-such-flag")
    assert proc.returncode == 2
    assert "unrecognized arguments" in proc.stderr
