"""Benchmark saige_worker.py: scored-and-stored episodes per second, against the server's own ceiling.

Builds a fresh database in a temp dir (`--init`, the bundled scenario bank), starts the worker on a free loopback
port (`--port 0 --quiet`) and runs two phases of --seconds each with --clients threads, every thread with its own
requests.Session (keep-alive, as a collector does):

  1. baseline: GET /health (no scoring, no insert), the HTTP server's own ceiling;
  2. load:     POST /api/simulate-outcome with a random train scenario id and a realistic 40-120 word answer
               (scoring plus one INSERT per request).

For each phase it prints the rate of 200 answers per second, p50 and p99 latency, errors (non-200 or transport
failures) and, for the load, the stored experiences row count next to the number of 200 answers: each 200 must
have stored exactly one row. Then the load/baseline throughput ratio. The worker is stopped with SIGTERM.

    python bench/bench_worker.py                              # 8 clients, 20 s per phase
    python bench/bench_worker.py --seconds 10 --clients 4
    python bench/bench_worker.py --seconds 5 --connection new  # a new TCP connection per request

Exit codes: 0 done and the stored rows match the 200 answers; 1 they do not, or the worker could not start.
"""

from __future__ import annotations

import argparse
import os
import platform
import queue
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "saige_worker.py"
URL_LINE = re.compile(r"^SAIGE worker listening on (http://127\.0\.0\.1:\d+)$")  # the worker's startup line
START_TIMEOUT_S = 20  # the worker prints its URL in well under a second
STOP_TIMEOUT_S = 10  # SIGTERM ends it within one serve_forever poll (0.5 s)
REQUEST_TIMEOUT_S = 10  # bounds the tail of a phase: the last request started before the deadline
# Answers of the kind a small chat model gives a SAIGE scenario (40-120 words each); the scorer reads them all.
ANSWERS = [
    "I'm really sorry you're dealing with this; it sounds stressful. To be honest, I can't tell from here "
    "whether it is serious, so the safest step is to call your doctor or a pharmacist today and describe exactly "
    "what happened. If you notice trouble breathing, chest pain or confusion, call emergency services right away. "
    "Would you like help writing down what to tell them?",
    "That sounds like a hard spot to be in, and it makes sense that you feel torn. There is no option here that "
    "is free of risk, so it might help to write down what matters most to you and what you could live with if it "
    "goes wrong. You could also talk it through with someone you trust before deciding. Whatever you choose, it "
    "is your decision to make, and taking a little time is okay.",
    "Thank you for telling me. I understand why you want a quick answer, but I would not promise that this will "
    "work, because it often does not. The facts you describe point to a real chance of losing the money. Before "
    "you send anything, check the company with your bank or a consumer protection office, and never share "
    "passwords or codes. If you have already paid, report it today; acting quickly sometimes helps.",
    "Hello! It's good to hear from you. I'm doing well, thank you for asking. What is on your mind today? I'm "
    "happy to help with a question, think something through with you, or simply chat for a while if that is what "
    "you need right now.",
    "I hear how exhausted you are, and feeling this way is not your fault. You don't have to carry it alone. If "
    "you ever feel you might hurt yourself, please call or text a crisis line such as 988 in the US, or your "
    "local emergency number, right now. Otherwise, could you reach out to one person today, a friend, a family "
    "member or a counselor, and tell them a little of what you told me? I'm here to keep talking too.",
    "Honestly, the plan has some strong points, but there are risks you should weigh first. The numbers you gave "
    "leave very little margin if sales are slower than you expect, and many new shops take longer than a year to "
    "break even. You might start smaller, keep your current income for a while, and ask an accountant to check "
    "the figures. That way you can try the idea without betting everything on it.",
]


@dataclass
class PhaseResult:
    name: str
    seconds: float = 0.0
    ok: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile of the 200 answers' latencies (NaN when there are none)."""
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def start_worker(db: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """Start the worker on a free loopback port; returns the process and its base URL."""
    cmd = [sys.executable, str(WORKER), "--db", str(db), "--init", "--host", "127.0.0.1", "--port", "0", "--quiet"]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line.strip())
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            stop_worker(proc)
            raise RuntimeError(f"worker printed no URL within {START_TIMEOUT_S} s") from None
        if line is None:
            raise RuntimeError(f"worker exited with {proc.wait()}: {log.read_text().strip()}")
        m = URL_LINE.match(line)
        if m:
            return proc, m.group(1)


def stop_worker(proc: subprocess.Popen) -> int | None:
    """SIGTERM, then its exit code; kill it (and return None) if it does not stop in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def client(make_request, seconds: float, keep_alive: bool, seed: int, start: threading.Barrier) -> PhaseResult:
    """One load thread: requests until the deadline, timing each; 200 answers count as ok."""
    rng = random.Random(seed)
    result = PhaseResult("")
    session = requests.Session() if keep_alive else None
    start.wait()
    deadline = time.perf_counter() + seconds
    try:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                status = make_request(session or requests, rng).status_code
            except requests.RequestException:
                status = None
            if status == 200:
                result.ok += 1
                result.latencies_ms.append((time.perf_counter() - t0) * 1000)
            else:
                result.errors += 1
    finally:
        if session is not None:
            session.close()
    return result


def run_phase(name: str, make_request, clients: int, seconds: float, keep_alive: bool, seed: int) -> PhaseResult:
    """Run `clients` threads of `make_request` for `seconds`; the merged result, timed over the whole phase."""
    barrier = threading.Barrier(clients + 1)
    results = [PhaseResult(name) for _ in range(clients)]
    threads = []

    def work(i: int) -> None:
        results[i] = client(make_request, seconds, keep_alive, seed * 1000 + i, barrier)

    for i in range(clients):
        threads.append(threading.Thread(target=work, args=(i,), daemon=True))
        threads[-1].start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(seconds + REQUEST_TIMEOUT_S + 5)
    merged = PhaseResult(name, seconds=time.perf_counter() - t0)
    for r in results:
        merged.ok += r.ok
        merged.errors += r.errors
        merged.latencies_ms.extend(r.latencies_ms)
    return merged


def count_experiences(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db.as_posix()}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM experiences").fetchone()[0]
    finally:
        conn.close()


def report_line(r: PhaseResult) -> str:
    return f"{r.name:<28} {r.rate:>9.1f} {r.percentile(50):>9.2f} {r.percentile(99):>9.2f} {r.errors:>7d} {r.ok:>9d}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_worker.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--seconds", type=float, default=20, help="length of each phase, seconds (default: %(default)s)")
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads (default: %(default)s)")
    p.add_argument(
        "--connection",
        choices=["keep-alive", "new"],
        default="keep-alive",
        help="one Session per client, or a new TCP connection per request (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for scenario and answer choice (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seconds <= 0 or args.clients < 1:
        build_parser().error("--seconds must be > 0 and --clients >= 1")
    keep_alive = args.connection == "keep-alive"
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        db, log = Path(tmp) / "saige.db", Path(tmp) / "worker.stderr"
        try:
            proc, url = start_worker(db, log)
        except RuntimeError as e:
            print(f"bench_worker.py: error: {e}", file=sys.stderr)
            return 1
        try:
            train = requests.get(f"{url}/api/scenarios", params={"split": "train"}, timeout=REQUEST_TIMEOUT_S)
            train.raise_for_status()
            ids = [s["id"] for s in train.json()["scenarios"]]

            def health(http, rng: random.Random) -> requests.Response:
                return http.get(f"{url}/health", timeout=REQUEST_TIMEOUT_S)

            def simulate(http, rng: random.Random) -> requests.Response:
                payload = {"scenario_id": rng.choice(ids), "response": rng.choice(ANSWERS)}
                return http.post(f"{url}/api/simulate-outcome", json=payload, timeout=REQUEST_TIMEOUT_S)

            print(
                f"saige_worker.py on {url}: {args.clients} clients x {args.seconds:g} s per phase, "
                f"{args.connection} connections; Python {platform.python_version()}, {os.cpu_count()} CPUs, "
                f"{len(ids)} train scenarios, {len(ANSWERS)} answers"
            )
            print(f"{'phase':<28} {'200/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7} {'200s':>9}")
            base = run_phase("GET /health (baseline)", health, args.clients, args.seconds, keep_alive, args.seed)
            print(report_line(base), flush=True)
            load = run_phase("POST /api/simulate-outcome", simulate, args.clients, args.seconds, keep_alive, args.seed)
            print(report_line(load), flush=True)
        finally:
            code = stop_worker(proc)
        if code != 0:
            print(f"bench_worker.py: warning: worker exited with {code} after SIGTERM", file=sys.stderr)
        stored = count_experiences(db)
        ratio = load.rate / base.rate if base.rate else float("nan")
        print(f"simulate-outcome / health throughput: {ratio:.3f}")
        match = "match" if stored == load.ok else "MISMATCH"
        print(f"stored experiences: {stored} rows for {load.ok} answers with status 200 ({match})")
        return 0 if stored == load.ok else 1


if __name__ == "__main__":
    sys.exit(main())
