"""train_local.py under `accelerate launch` with two processes on the CPU (gloo), on the tiny Llama built here.

accelerate 1.16's `--cpu --num_processes 2` starts a single process on one machine (several CPU processes need
mpirun and a hostfile), so the launcher runs with `--multi_gpu`, i.e. torchrun: on a machine without a GPU the
trainer asks for the CPU (use_cpu) and accelerate joins the two processes with gloo. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import saige_db
from conftest import ROOT, run

pytestmark = pytest.mark.slow  # each test starts two training processes: `make test-slow`

SCRIPT = str(ROOT / "train_local.py")
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
BANK = json.loads((ROOT / "data" / "scenarios.json").read_text())
# The held-out loss of the adapter trained on two processes against one process's, same rows and global batch
# (test_two_processes_learn_what_one_process_learns). Only float32 round-off separates them: the all-reduce sums
# the two half-batch gradients in another order than one process does. Measured 2026-12-02 (12 steps, lr 1e-2):
# every step's training loss equal to 1e-6, held-out loss gap 6e-8; 1e-4 leaves room for other CPUs' kernels.
# (The eval_loss the Trainer itself reports differed by 1.3e-3 on 4 eval rows: under DDP it averages each rank's
# batch mean rather than every token, so the test computes the held-out loss itself, in one process.)
TOLERANCE = 1e-4
TINY = ["--max-length", "256", "--lora-dropout", "0", "-q"]  # fast and deterministic: no dropout noise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(tmp_path: Path) -> tuple[list[str], dict]:
    """The accelerate launch command for two CPU processes, and an environment free of the user's accelerate
    settings (ACCELERATE_*, a default config under HF_HOME) and of the network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), SCRIPT,
    ]  # fmt: skip
    return cmd, env


def launch(tmp_path: Path, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd, env = launcher(tmp_path)
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def summary(out: Path) -> dict:
    return json.loads((out / "training_summary.json").read_text())


def our_traceback(stderr: str) -> bool:
    """A traceback through train_local.py (the launcher prints its own when a rank exits non-zero)."""
    return 'train_local.py", line' in stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """The converter's SFT rows (ChatML, with sidecar) and DPO pairs from one database: 16 scenarios, each with a
    good and a bad answer."""
    folder = tmp_path_factory.mktemp("accel-data")
    conn = saige_db.create(folder / "saige.db")
    with conn:
        for s in BANK[:16]:
            sid = saige_db.add_scenario(conn, s["context"], s["person_state"], s["facts"], s["critical_info"], 1)
            saige_db.add_experience(conn, sid, s["expected_response"], 0.05, dict.fromkeys(saige_db.WEIGHTS, 9.0))
            saige_db.add_experience(conn, sid, "No. Figure it out.", 0.6, dict.fromkeys(saige_db.WEIGHTS, 3.0))
    conn.close()
    result = run(
        "saige_to_sft.py", "--db", folder / "saige.db", "-o", folder / "sft.csv", "--format", "chatml",
        "--dpo-output", folder / "pairs.jsonl", "-q",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return {"sft": folder / "sft.csv", "dpo": folder / "pairs.jsonl"}


def test_sft_dpo_and_grpo_train_one_adapter_with_one_summary(tiny_model, data, worker_url, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for method, args in {
        "sft": ["--data", data["sft"], "--max-steps", "8", "--batch-size", "2", "--learning-rate", "3e-3"],
        "dpo": ["--data", data["dpo"], "--max-steps", "6", "--batch-size", "2", "--learning-rate", "3e-3"],
        "grpo": ["--worker-url", worker_url, "--max-steps", "2", "--batch-size", "4", "--max-completion-length", "12"],
    }.items():
        out = tmp_path / method
        started = time.monotonic()
        result = launch(tmp_path, "--method", method, "--model", tiny_model, "--output-dir", out,
                        "--logging-steps", "1", "--eval-split", "0", *TINY, *args)  # fmt: skip
        assert result.returncode == 0, result.stderr
        print(f"{method}: {time.monotonic() - started:.0f}s")
        report = summary(out)
        assert report["world_size"] == 2 and len(report["rank_memory"]) == 2
        assert all(m["peak_rss_mb"] > 0 for m in report["rank_memory"])
        assert report["steps"] == int(args[args.index("--max-steps") + 1])
        assert report["first_train_loss"] is not None and report["final_train_loss"] is not None
        if method != "grpo":  # GRPO's loss is not a measure of progress (it starts at zero)
            assert report["final_train_loss"] < report["first_train_loss"], report["loss_history"]
        else:
            assert report["scoring_calls"] >= 2 * 8 - 8  # 4 answers per rank and step (empty answers not sent)
        # one writer: one done line, no line printed twice, no checkpoint left behind
        assert result.stderr.count("train_local.py: done:") == 1, result.stderr
        assert result.stderr.count("--method " + method) == 1, result.stderr
        assert not list(out.glob("checkpoint-*")) and not our_traceback(result.stderr)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
        assert any("lora_A" in name for name, _ in model.named_parameters())


def test_ctrl_c_stops_both_ranks_with_a_checkpoint_and_resume_finishes(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    cmd, env = launcher(tmp_path)
    args = ["--data", data["sft"], "--model", tiny_model, "--output-dir", out, "--batch-size", "1",
            "--max-steps", "60", "--save-steps", "10", "--eval-split", "0", *TINY]  # fmt: skip
    cmd += [str(a) for a in args]
    # a terminal's Ctrl-C goes to the whole foreground process group; torchrun starts the ranks in sessions of their
    # own, so only the launcher gets it, and it sends it on to each rank
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint-10").exists():  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, "training never reached step 10"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        signalled = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    seconds = time.monotonic() - signalled
    assert proc.returncode == 130, stderr
    # under torchrun's 30 s grace: the ranks stopped by themselves, they were not killed
    assert seconds < 25, f"{seconds:.0f}s from Ctrl-C to exit"
    assert stderr.count("train_local.py: interrupted at step") == 1 and "--resume" in stderr, stderr
    step = int(stderr.split("interrupted at step ")[1].split(";")[0])
    assert 10 <= step < 60
    saved = out / f"checkpoint-{step}"  # saved by both ranks together: each wrote its random state
    assert (saved / "adapter_model.safetensors").is_file(), sorted(p.name for p in out.iterdir())
    assert {p.name for p in saved.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    result = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert summary(out)["steps"] == 60 and (out / "adapter_model.safetensors").is_file()


def test_max_minutes_stops_both_ranks_at_the_same_step(tiny_model, data, tmp_path):
    out = tmp_path / "o"
    result = launch(tmp_path, "--method", "dpo", "--data", data["dpo"], "--model", tiny_model, "--output-dir", out,
                    "--batch-size", "2", "--max-steps", "50", "--max-minutes", "0.0001", *TINY)  # fmt: skip
    # a rank that stopped alone would leave the other waiting in DDP's all-reduce: the timeout would fire
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("--max-minutes 0.0001 reached at step 1") == 1, result.stderr
    assert summary(out)["steps"] == 1 and (out / "adapter_model.safetensors").is_file()


def test_grpo_worker_dying_mid_run_ends_both_ranks_with_a_checkpoint(tiny_model, tmp_path):
    worker = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "saige_worker.py"),
            "--db",
            str(tmp_path / "w.db"),
            "--init",
            "--port",
            "0",
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    out = tmp_path / "o"
    cmd, env = launcher(tmp_path)
    try:
        line = worker.stdout.readline()
        assert re.search(r"http://[\d.]+:\d+", line), f"the worker did not start: {line!r}"
        url = re.search(r"http://[\d.]+:\d+", line).group(0)
        cmd += ["--method", "grpo", "--worker-url", url, "--model", str(tiny_model), "--output-dir", str(out),
                "--batch-size", "4", "--max-steps", "50", "--save-steps", "1", "--max-completion-length", "8",
                "--worker-retries", "1", "--worker-timeout", "5", *TINY]  # fmt: skip
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        deadline = time.monotonic() + 240
        while not (out / "checkpoint-1").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "training never reached step 1"
            time.sleep(0.05)
        worker.kill()  # the worker dies mid-run: every later score fails to connect
        try:
            _, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    finally:
        worker.kill()
        worker.wait(timeout=10)
    assert proc.returncode == 1, stderr
    assert stderr.count("failed to score an answer") == 1 and "--resume" in stderr, stderr
    assert not our_traceback(stderr), stderr
    step = int(stderr.split("checkpoint in ")[1].split("checkpoint-")[1].split(".")[0])
    saved = out / f"checkpoint-{step}"
    assert (saved / "adapter_model.safetensors").is_file()
    assert {p.name for p in saved.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}


def heldout_loss(model: Path, adapter: Path, texts: list[str]) -> float:
    """The adapter's mean token loss on texts it never saw, computed in this one process for both adapters alike."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), adapter).eval()
    with torch.no_grad():
        batches = [tokenizer(text, return_tensors="pt") for text in texts]
        losses = [tuned(**ids, labels=ids["input_ids"]).loss.item() for ids in batches]
    return sum(losses) / len(losses)


def test_two_processes_learn_what_one_process_learns(tiny_model, data, tmp_path):
    """The same rows and global batch (4 on one process, 2 on each of two) train the same adapter: DDP averages the
    two halves' gradients, which is the whole batch's gradient. Rows are drawn in one order (accelerate deals a
    single process's batches of 2 to the ranks in turn; --group-by-length would sort by batch size). In fp32: bf16
    autocast (the default on a CPU that computes it) rounds a half batch's sums differently from the whole's."""
    same = ["--data", data["sft"], "--model", tiny_model, "--max-steps", "12", "--save-steps", "12",
            "--eval-split", "0.25", "--learning-rate", "1e-2", "--logging-steps", "1", "--no-group-by-length",
            "--precision", "fp32", *TINY]  # fmt: skip
    one = run("train_local.py", *same, "--output-dir", tmp_path / "one", "--batch-size", "4", timeout=300)
    assert one.returncode == 0, one.stderr
    two = launch(tmp_path, *same, "--output-dir", tmp_path / "two", "--batch-size", "2")
    assert two.returncode == 0, two.stderr
    curves = [[h["loss"] for h in summary(tmp_path / out)["loss_history"] if "loss" in h] for out in ("one", "two")]
    assert len(curves[0]) == len(curves[1]) == 12
    assert max(abs(a - b) for a, b in zip(*curves)) < 1e-4, curves  # every step: the same batch, split in two
    texts = [f"{s['context']} {s['expected_response']}" for s in BANK[40:48]]  # never in the training rows
    losses = [heldout_loss(tiny_model, tmp_path / out, texts) for out in ("one", "two")]
    gap = abs(losses[0] - losses[1])
    print(f"held-out loss: 1 process {losses[0]:.6f}, 2 processes {losses[1]:.6f}, gap {gap:.2e}")
    assert gap < TOLERANCE
