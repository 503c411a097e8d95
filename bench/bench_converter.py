"""Benchmark saige_to_sft.py against the old tool's approach, in one run, on synthetic SAIGE databases.

Baseline (what the old converter did): SELECT every joined row into Python, json.loads each row's JSON
columns, build a pandas DataFrame, filter and sort it there, and write it with to_csv. Both run as separate processes
on the same database with the default thresholds; peak RSS is each process's own (os.wait4).

    python bench/bench_converter.py                       # 100k and 1M experiences over 2,000 scenarios
    python bench/bench_converter.py --sizes 20000 --keep  # a quick run; keep the databases in bench/results/
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import saige_db  # noqa: E402

SCENARIOS = 2_000
RESPONSE_BYTES = 1_000  # a realistic answer is a few sentences to a paragraph (~1 KB)
WORDS = "kind true calm help safe listen care wise gentle honest clear patient friend doctor call rest".split()

BASELINE = r"""
import json, sqlite3, sys
import pandas as pd
db, out = sys.argv[1], sys.argv[2]
W = {"ahimsa": 0.25, "sacca": 0.20, "karuna": 0.25, "panna": 0.20, "upekkha": 0.10}
conn = sqlite3.connect(db)
rows = conn.execute(
    "SELECT e.id, e.scenario_id, e.ai_response, e.actual_harm, e.harm_breakdown, e.buddhist_scores,"
    " e.buddhist_alignment, e.timestamp, s.context, s.person_state, s.difficulty_level"
    " FROM experiences e JOIN scenarios s ON s.id = e.scenario_id").fetchall()
records = []
for (eid, sid, answer, harm, breakdown, scores, alignment, stamp, context, state, difficulty) in rows:
    scores, breakdown, state = json.loads(scores), json.loads(breakdown), json.loads(state)
    records.append({"experience_id": eid, "scenario_id": sid, "answer": answer, "harm_score": harm,
                    "buddhist_alignment": alignment, "weighted_score": sum(W[k] * scores[k] for k in W),
                    "difficulty": difficulty, "timestamp": stamp, "context": context})
df = pd.DataFrame(records)
df = df[(df.harm_score <= 0.3) & df.buddhist_alignment.isin(["good", "excellent"]) & (df.weighted_score >= 6.0)]
df = df.sort_values(["harm_score", "timestamp"], ascending=[True, False])
df["text"] = [f"<s>[INST] {c} [/INST] {a}</s>" for c, a in zip(df.context, df.answer)]
columns = ["text", "harm_score", "buddhist_alignment", "weighted_score", "difficulty", "scenario_id", "experience_id"]
df[columns].to_csv(out, index=False)
print(len(df))
"""


def build(path: Path, n: int, seed: int = 0) -> None:
    """A synthetic DB with the contract's schema: n experiences, ~1 KB answers, realistic score spread."""
    rng = random.Random(seed)
    conn = saige_db.create(path)
    with conn:
        for i in range(SCENARIOS):
            state = {"vulnerability": rng.choice(["low", "medium", "high"]), "mood": rng.choice(["neutral", "anxious"])}
            saige_db.add_scenario(
                conn, f"Scenario {i}: " + " ".join(rng.choices(WORDS, k=30)), state, difficulty=1 + i % 5
            )

    def rows():
        for i in range(n):
            scores = {k: round(rng.uniform(3, 10), 1) for k in saige_db.WEIGHTS}
            weighted = sum(saige_db.WEIGHTS[k] * scores[k] for k in saige_db.WEIGHTS)
            harm = round(rng.uniform(0, 0.6), 3)
            text = " ".join(rng.choices(WORDS, k=RESPONSE_BYTES // 6))
            yield (
                1 + i % SCENARIOS,
                text,
                harm,
                json.dumps(dict.fromkeys(["deception", "harshness", "omission", "manipulation"], harm)),
                json.dumps(scores),
                saige_db.alignment_for(weighted),
                f"2026-01-{1 + i % 28:02d}T10:00:{i % 60:02d}.000Z",
            )

    with conn:
        conn.executemany(
            "INSERT INTO experiences (scenario_id, ai_response, actual_harm, harm_breakdown, buddhist_scores,"
            " buddhist_alignment, timestamp) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows(),
        )
    conn.close()


def measure(cmd: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, stdout) of one command run as its own process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{err}")
    return seconds, usage.ru_maxrss / 1024, out


def ids(path: Path) -> set[int]:
    """The experience ids a CSV holds (read with the csv module: answers span lines)."""
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return {int(row["experience_id"]) for row in csv.DictReader(f)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="experience counts")
    parser.add_argument("--workdir", default=str(ROOT / "bench" / "results"), help="where the databases go")
    parser.add_argument("--keep", action="store_true", help="keep the databases and outputs")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"{'rows':>9} {'ours s':>8} {'base s':>8} {'speedup':>8} {'ours MB':>8} {'base MB':>8} {'selected':>9}"
        "  (same rows selected by both: checked)"
    )
    for n in args.sizes:
        db = work / f"bench-{n}.db"
        if not db.exists():
            t = time.perf_counter()
            build(db, n)
            print(
                f"(built {db.name}: {db.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t:.0f}s)",
                file=sys.stderr,
            )
        ours_out, base_out = work / f"ours-{n}.csv", work / f"base-{n}.csv"
        ours_s, ours_mb, _ = measure(
            [sys.executable, str(ROOT / "saige_to_sft.py"), "--db", str(db), "-o", str(ours_out), "-q"]
        )
        base_s, base_mb, selected = measure([sys.executable, "-c", BASELINE, str(db), str(base_out)])
        print(
            f"{n:>9} {ours_s:>8.1f} {base_s:>8.1f} {base_s / ours_s:>7.1f}x {ours_mb:>8.0f} {base_mb:>8.0f} "
            f"{selected.strip():>9}",
            flush=True,
        )
        if ids(ours_out) != ids(base_out):
            raise SystemExit(f"the converter and the baseline selected different rows at {n}")
        for f in (ours_out, base_out, Path(f"{ours_out}.meta.json")):
            f.unlink(missing_ok=True)
        if not args.keep:
            db.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
