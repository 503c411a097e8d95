"""The improvement loop, measured: `make demo` on a fresh database, timed, with base vs tuned on the held-out split.

Runs the README's main command (train_pipeline.sh with the Makefile's DEMO_SETTINGS: the offline SmolLM2-135M,
a local worker, collect best-of-K, convert, LoRA, evaluate against the base) into a fresh folder, and prints the
wall time and the held-out figures the issue asks for: mean weighted score and harm of base and tuned, the
difference with its paired bootstrap 95% CI, wins/ties/losses, answer length and distinct-2.

    python bench/bench_loop.py                       # 9-11 minutes on 2 CPU cores; minutes per stage too
    python bench/bench_loop.py --seeds 1,2,3         # the loop three times, collection seeds 1..3
    python bench/bench_loop.py --settings "TRAINING_EPISODES=400 EPOCHS=3"   # on top of DEMO_SETTINGS
    python bench/bench_loop.py --iterations 3        # three loop iterations, each against the base and the one before
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def demo_settings() -> dict:
    line = subprocess.run(["make", "-s", "-C", str(ROOT), "demo-settings"], capture_output=True, text=True).stdout
    return dict(item.split("=", 1) for item in shlex.split(line))


def run_loop(folder: Path, settings: dict, db: Path | None = None) -> list[dict]:
    """One pipeline run into `folder` (database `db`, else a new one there): per iteration that ran, the run's wall
    time, the iteration's stage times, evaluation and training summary."""
    db = db or folder / "saige.db"
    env = {**os.environ, **settings, "DB_PATH": str(db), "OUTPUT_DIR": str(folder / "pipeline")}
    started = time.monotonic()
    with open(folder / "pipeline.log", "w") as log:
        code = subprocess.run(["bash", str(ROOT / "train_pipeline.sh")], env=env, stdout=log, stderr=log).returncode
    seconds = time.monotonic() - started
    if code != 0:
        sys.exit(f"bench_loop.py: the pipeline failed (exit {code}); see {folder / 'pipeline.log'}")
    iterations = []
    for i in range(1, int(settings.get("ITERATIONS", 1)) + 1):
        it = folder / "pipeline" / f"iter-{i}"
        if not (it / "eval.json").is_file():  # STOP_WHEN_WORSE ended the loop before this one
            break
        stages = dict(line.split("\t") for line in (it / "stage_seconds.tsv").read_text().splitlines())
        iterations.append({
            "seconds": round(seconds, 1),
            "stages": {name: int(s) for name, s in stages.items()},
            "eval": json.loads((it / "eval.json").read_text()),
            "train": json.loads((it / "adapter" / "training_summary.json").read_text()),
        })  # fmt: skip
    return iterations


def row(label: str, result: dict) -> dict:
    (tuned_name, tuned), (_, base) = result["eval"]["summaries"].items()
    c = result["eval"]["comparison"]
    previous = (result["eval"].get("previous") or {}).get("comparison")
    return {
        "run": label,
        "minutes": round(result["seconds"] / 60, 1),
        "stage_minutes": {name: round(s / 60, 1) for name, s in result["stages"].items()},
        "examples": result["train"]["train_rows"] + result["train"]["eval_rows"],
        "base": round(base["weighted_score"], 3),
        "tuned": round(tuned["weighted_score"], 3),
        "delta": round(c["mean_difference"], 3),
        "ci95": [round(x, 3) for x in c["ci95"]],
        "harm_base": round(base["total_harm"], 3),
        "harm_tuned": round(tuned["total_harm"], 3),
        "wins_ties_losses": [c["wins"], c["ties"], c["losses"]],
        "words": [round(tuned["mean_words"], 1), round(base["mean_words"], 1)],
        "distinct2": [round(tuned["distinct2"], 3), round(base["distinct2"], 3)],
        "vs_previous": previous and [round(previous["mean_difference"], 3), [round(x, 3) for x in previous["ci95"]]],
        "other_judges": {  # the judges the loop did not train against (issue 15): chrF against the references, ...
            name: [round(j["comparison"]["mean_difference"], 3), [round(x, 3) for x in j["comparison"]["ci95"]]]
            for name, j in (result["eval"].get("judges") or {}).items()
            if not j.get("trained_against") and j.get("comparison")
        },
    }


def versus(previous) -> str:
    return f"{previous[0]:+.2f} ({previous[1][0]:+.2f} to {previous[1][1]:+.2f})" if previous else "-"


def print_table(rows: list[dict]) -> None:
    print(f"{'run':<10} {'min':>5} {'ex':>4} {'base':>6} {'tuned':>6} {'delta (95% CI)':>24} {'harm b->t':>13} "
          f"{'W/T/L':>9} {'words t/b':>11} {'dist2 t/b':>11} {'vs previous (95% CI)':>24}")  # fmt: skip
    for r in rows:
        ci = f"{r['delta']:+.2f} ({r['ci95'][0]:+.2f} to {r['ci95'][1]:+.2f})"
        print(
            f"{r['run']:<10} {r['minutes']:>5} {r['examples']:>4} {r['base']:>6.2f} {r['tuned']:>6.2f} {ci:>24} "
            f"{r['harm_base']:.3f}->{r['harm_tuned']:.3f} {'/'.join(map(str, r['wins_ties_losses'])):>9} "
            f"{r['words'][0]:>5.0f}/{r['words'][1]:<5.0f} {r['distinct2'][0]:.2f}/{r['distinct2'][1]:.2f}"
            f" {versus(r['vs_previous']):>24}"
        )
    for r in rows:
        for name, judged in r["other_judges"].items():
            print(f"{r['run']:<10} under {name}: {versus(judged)}")
    print("\nminutes per stage (the rest of each run's total is starting the worker and loading the model):")
    for r in rows:
        print(f"{r['run']:<10} " + "  ".join(f"{name} {m}" for name, m in r["stage_minutes"].items()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="", help="extra VAR=value settings, on top of the Makefile's DEMO_SETTINGS")
    p.add_argument("--seeds", default="", help="comma-separated collection seeds: one full loop per seed")
    p.add_argument("--iterations", type=int, default=1, help="loop iterations per run (ITERATIONS; default: 1)")
    p.add_argument("--keep", help="keep every run's folder under this directory (default: a temporary one)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "loop.json"), help="results JSON")
    args = p.parse_args()
    settings = {**demo_settings(), "ITERATIONS": str(args.iterations)}
    settings.update(item.split("=", 1) for item in shlex.split(args.settings))
    print("settings:", " ".join(f"{k}={v}" for k, v in settings.items()), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(args.keep or tmp)
        for seed in args.seeds.split(",") if args.seeds else [""]:
            label = f"seed {seed}" if seed else "demo"
            folder = base_dir / (f"seed-{seed}" if seed else "demo")
            folder.mkdir(parents=True, exist_ok=True)
            run_settings = {**settings, **({"SEED": seed} if seed else {})}
            for i, result in enumerate(run_loop(folder, run_settings), 1):
                rows.append(row(f"{label} it{i}" if args.iterations > 1 else label, result))
                print(f"{rows[-1]['run']}: {json.dumps(rows[-1])}", flush=True)
    print_table(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": settings, "runs": rows}, indent=2))
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
