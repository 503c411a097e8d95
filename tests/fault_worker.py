"""A misbehaving SAIGE worker for the tests: a loopback proxy in front of a real saige_worker.py that answers each
request with the next fault queued for its method (5xx bursts, 429, stalls, truncated or malformed JSON, wrong types,
NaN, a scenario id that is a list, dying mid-run), and the tiny loopback HTTP server it runs on.

    with serve(FaultProxy(worker_url, post=["500", "nan"])) as url: ...   # then point a tool at url
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

STALL_S = 2.5  # a stalled answer; the tools run with --timeout 1 in the tests


# --- loopback test servers -------------------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict = field(default_factory=lambda: {"Content-Type": "application/json"})
    declared_length: int | None = None  # a Content-Length larger than the body: a truncated answer


def json_reply(status: int, payload) -> Reply:
    return Reply(status, json.dumps(payload).encode())


class Handler(BaseHTTPRequestHandler):
    """Hands every request to server.app(method, path, headers, body) -> Reply, or None to hang up."""

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def dispatch(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        reply = self.server.app(method, self.path, self.headers, body)
        self.close_connection = True
        if reply is None:
            return
        length = reply.declared_length or len(reply.body)
        head = [f"HTTP/1.1 {reply.status} X", f"Content-Length: {length}", "Connection: close"]
        head += [f"{k}: {v}" for k, v in reply.headers.items()]
        # one write, so neither Nagle nor delayed ACKs add latency
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode() + reply.body)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve(app):
    """Run `app` on a free loopback port; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.app = app
    app.server = server
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        if not getattr(app, "dead", False):
            server.shutdown()
            server.server_close()


def _without(key: str):
    def mutate(payload: dict) -> dict:
        payload.pop(key, None)
        return payload

    return mutate


def _scores(value):
    """Every principle score and the weighted score set to `value` (NaN, Infinity, a string...)."""

    def mutate(outcome: dict) -> dict:
        assessment = outcome.get("buddhist_assessment") or {}
        assessment["principle_scores"] = {k: value for k in assessment.get("principle_scores", {})}
        assessment["weighted_score"] = value
        return outcome

    return mutate


MUTATIONS = {  # fault name -> how a correct JSON answer is spoiled (scenario answers for GET, outcomes for POST)
    "missing-context": _without("context"),
    "list-id": lambda s: {**s, "id": [s.get("id")]},
    "string-context": lambda s: {**s, "context": 42},
    "state-not-object": lambda s: {**s, "person_state": "anxious"},
    "not-object": lambda payload: [payload],
    "nan": _scores(float("nan")),
    "infinity": _scores(float("inf")),
    "string-scores": _scores("high"),
    "harm-string": lambda o: {**o, "total_harm": "low"},
    "harm-nan": lambda o: {**o, "total_harm": float("nan")},
    "breakdown-list": lambda o: {**o, "breakdown": [0, 0, 0, 0]},
    "no-assessment": _without("buddhist_assessment"),
    # a /api/scenarios listing (the evaluator's suite) whose every scenario id is a list
    "scenarios-list-id": lambda p: {**p, "scenarios": [{**s, "id": [s.get("id")]} for s in p.get("scenarios", [])]},
}


class FaultProxy:
    """Forwards to the worker, except for the faults queued per method: each request takes the next one."""

    def __init__(self, upstream: str, get=(), post=(), die_after_posts: int | None = None, hide=()):
        self.upstream = upstream
        self.hide = set(hide)  # paths answered 404 'Not found', as the real SAIGE worker has no extras
        self.faults = {"GET": list(get), "POST": list(post)}
        self.die_after_posts = die_after_posts
        self.seen: Counter = Counter()
        self.forwarded_posts = 0
        self.dead = False
        self.lock = threading.Lock()

    def forward(self, method: str, path: str, headers, body: bytes) -> Reply:
        auth = {"Authorization": headers["Authorization"]} if headers.get("Authorization") else {}
        r = requests.request(method, self.upstream + path, data=body, headers=auth, timeout=10)
        return Reply(r.status_code, r.content, {"Content-Type": r.headers.get("Content-Type", "application/json")})

    def __call__(self, method: str, path: str, headers, body: bytes) -> Reply | None:
        with self.lock:
            if self.dead:
                return None
            if path.split("?")[0] in self.hide:
                return Reply(404, b"Not found", {"Content-Type": "text/plain"})
            api = path.startswith("/api/")
            self.seen[method, path.split("?")[0]] += 1
            fault = self.faults[method].pop(0) if api and self.faults[method] else None
            last = False
            if method == "POST" and api and self.die_after_posts is not None:
                if self.forwarded_posts >= self.die_after_posts:
                    return None  # a POST racing the last one: the dying proxy never forwards it
                self.forwarded_posts += 1
                last = self.forwarded_posts == self.die_after_posts
        if fault in ("500", "502", "503"):
            return json_reply(int(fault), {"error": "injected failure"})
        if fault == "html":  # a proxy's error page where JSON was expected
            return Reply(200, b"<html><body>Bad gateway</body></html>", {"Content-Type": "text/html"})
        if fault == "429":
            return Reply(429, b'{"error": "slow down"}', {"Content-Type": "application/json", "Retry-After": "1"})
        if fault == "stall":
            time.sleep(STALL_S)
            return None
        if fault == "malformed" and method == "GET":
            return Reply(200, b'{"id": 3, "context": "an unterminated')
        reply = self.forward(method, path, headers, body)
        if fault == "stored-500":  # the worker did its work (a POST stored it), then a gateway failed: retry = twice
            return json_reply(500, {"error": "injected failure after the work was done"})
        if fault == "stored-hangup":  # the same, with the connection dropped before any answer
            return None
        if fault == "malformed":  # the worker stored it; the answer comes back broken
            return Reply(200, reply.body[: len(reply.body) // 2])
        if fault == "truncate":
            return Reply(reply.status, reply.body[: len(reply.body) // 2], declared_length=len(reply.body))
        if fault in MUTATIONS:  # the worker did its work (a POST stored it); the answer comes back wrong
            return json_reply(reply.status, MUTATIONS[fault](json.loads(reply.body)))
        if last:  # answer this one, then refuse everything: new connections and old
            with self.lock:
                self.dead = True
            threading.Thread(target=lambda: (self.server.shutdown(), self.server.server_close())).start()
        return reply
