"""SFT vs DPO vs GRPO from the same base, the same scenarios and the same training budget, on this machine.

One collection (the Makefile's DEMO_SETTINGS: the offline SmolLM2-135M answers the worker's training scenarios,
best-of-K), then three adapters, each trained for at most --budget-minutes:

  sft   train_pipeline.sh METHOD=sft: LoRA on the answers that pass the thresholds
  dpo   METHOD=dpo on the same database: best kept answer vs worst answer of each scenario
  grpo  METHOD=grpo: online RL on the training scenarios, rewarded by the worker's non-storing scorer

and each is evaluated against the base on the held-out split with test_model.py --compare (greedy). The table
shows the training wall time, held-out weighted score and harm, the difference from the base with its paired
bootstrap 95% CI, answer length and distinct-2 (an improvement with degenerate text is not one).

    python bench/bench_methods.py                      # about 40 minutes on 2 CPU cores
    python bench/bench_methods.py --budget-minutes 4 --methods sft,grpo
    python bench/bench_methods.py --methods sft,dpo --settings "DPO_PAIRS=each dpo.LEARNING_RATE=1e-4"  # dpo only
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loop import ROOT, demo_settings, run_loop  # noqa: E402


def finished_run(run_dir: Path) -> dict | None:
    """A method already trained and evaluated in a --keep folder (a cut benchmark resumes where it stopped)."""
    it = run_dir / "pipeline" / "iter-1"
    if not (it / "eval.json").is_file():
        return None
    train = json.loads((it / "adapter" / "training_summary.json").read_text())
    return {"seconds": None, "eval": json.loads((it / "eval.json").read_text()), "train": train}


def method_row(method: str, result: dict) -> dict:
    (_, tuned), (_, base) = result["eval"]["summaries"].items()
    c = result["eval"]["comparison"]
    train = result["train"]
    return {
        "method": method,
        "train_minutes": round(train["seconds"] / 60, 1),
        "steps": train["steps"],
        "rows": train["train_rows"] + train["eval_rows"],
        "weighted": round(tuned["weighted_score"], 3),
        "base": round(base["weighted_score"], 3),
        "delta": round(c["mean_difference"], 3),
        "ci95": [round(x, 3) for x in c["ci95"]],
        "harm": round(tuned["total_harm"], 3),
        "harm_base": round(base["total_harm"], 3),
        "words": round(tuned["mean_words"], 1),
        "distinct2": round(tuned["distinct2"], 3),
        "base_words": round(base["mean_words"], 1),
        "base_distinct2": round(base["distinct2"], 3),
        "warning": result["eval"].get("degenerate_warning"),
    }


def per_scenario(result: dict) -> dict:
    """The tuned model's mean weighted score on each held-out scenario (over its samples)."""
    answers = next(iter(result["eval"]["results"].values()))
    scores: dict = {}
    for a in answers:
        scores.setdefault(a["scenario_id"], []).append(a["outcome"]["buddhist_assessment"]["weighted_score"])
    return {k: sum(v) / len(v) for k, v in scores.items()}


def versus(result: dict, reference: dict, resamples: int = 2000) -> tuple[float, list[float]]:
    """Paired difference of two methods on the same scenarios, with a bootstrap 95% CI (as test_model.py does)."""
    import numpy as np

    mine, theirs = per_scenario(result), per_scenario(reference)
    diffs = np.array([mine[k] - theirs[k] for k in sorted(mine.keys() & theirs.keys())])
    means = diffs[np.random.default_rng(42).integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    return round(float(diffs.mean()), 3), [round(float(x), 3) for x in np.percentile(means, [2.5, 97.5])]


def print_table(rows: list[dict]) -> None:
    base = rows[0]
    print(f"\nbase (SmolLM2-135M): weighted {base['base']:.2f}, harm {base['harm_base']:.3f}, "
          f"{base['base_words']:.0f} words, distinct-2 {base['base_distinct2']:.2f}")  # fmt: skip
    print(f"{'method':<7} {'train min':>9} {'steps':>5} {'rows':>5} {'weighted':>8} {'delta vs base (95% CI)':>26} "
          f"{'harm':>6} {'words':>6} {'dist-2':>6}")  # fmt: skip
    for r in rows:
        ci = f"{r['delta']:+.2f} ({r['ci95'][0]:+.2f} to {r['ci95'][1]:+.2f})"
        print(
            f"{r['method']:<7} {r['train_minutes']:>9} {r['steps']:>5} {r['rows']:>5} {r['weighted']:>8.2f} {ci:>26} "
            f"{r['harm']:>6.3f} {r['words']:>6.0f} {r['distinct2']:>6.2f}"
            + (
                f"  vs sft {r['vs_sft']:+.2f} ({r['vs_sft_ci95'][0]:+.2f} to {r['vs_sft_ci95'][1]:+.2f})"
                if "vs_sft" in r
                else ""
            )
            + ("  (degenerate?)" if r["warning"] else "")
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-minutes", type=float, default=8, help="training budget per method (default: 8)")
    p.add_argument("--methods", default="sft,dpo,grpo", help="which methods, in order (default: sft,dpo,grpo)")
    p.add_argument(
        "--settings",
        default="",
        help="extra VAR=value settings, on top of the Makefile's DEMO_SETTINGS; METHOD.VAR=value for one method only",
    )
    p.add_argument(
        "--keep", help="keep the runs under this directory, and resume there: finished methods are not rerun"
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "methods.json"), help="results JSON")
    args = p.parse_args()
    settings = {**demo_settings(), "TRAIN_MINUTES": str(args.budget_minutes)}
    given = dict(item.split("=", 1) for item in shlex.split(args.settings))
    settings.update({k: v for k, v in given.items() if "." not in k})
    only = {k: v for k, v in given.items() if "." in k}  # method.VAR=value
    print("settings:", " ".join(f"{k}={v}" for k, v in {**settings, **only}.items()), flush=True)
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        for method in args.methods.split(","):
            run_dir = folder / method
            result = finished_run(run_dir) if args.keep else None
            if result is None:  # the first run collects; the others reuse its database: the same experiences
                extra = {"METHOD": method, "SKIP_COLLECT": "1" if (folder / "saige.db").exists() else "0"}
                extra.update({k.split(".", 1)[1]: v for k, v in only.items() if k.split(".", 1)[0] == method})
                if method == "grpo":
                    extra["EPOCHS"] = "100"  # online RL: the budget, not the epochs, ends it
                run_dir.mkdir(parents=True, exist_ok=True)
                result = run_loop(run_dir, {**settings, **extra}, db=folder / "saige.db")[0]  # its one iteration
            rows.append(method_row(method, result))
            if method != "sft" and "sft" in results:  # the target: a method that beats SFT, CI above zero
                rows[-1]["vs_sft"], rows[-1]["vs_sft_ci95"] = versus(result, results["sft"])
            results[method] = result
            print(f"{method}: {json.dumps(rows[-1])}", flush=True)
    print_table(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": {**settings, **only}, "methods": rows}, indent=2))
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
