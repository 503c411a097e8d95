"""A loopback stand-in for Ollama's HTTP API, as its API docs describe it: GET /api/tags, HEAD and POST
/api/blobs/sha256:<digest> (the body must hash to the digest), POST /api/create (a base by name or by uploaded
file, LoRA adapters by uploaded blob, template, system, parameters; anything else is refused) and POST /api/chat.
Ollama itself cannot be installed here; this checks that what the pipeline sends is what Ollama accepts.

    app = OllamaStub(["tinyllama:1.1b"])
    with serve(app) as url: ...   # app.created holds every accepted /api/create request, app.chats the chat models
"""

from __future__ import annotations

import hashlib
import json
import re

from fault_worker import json_reply

CREATE_FIELDS = {"model", "from", "files", "adapters", "template", "system", "parameters", "stream", "license"}


class OllamaStub:
    def __init__(self, models: list[str]):
        self.models = list(models)
        self.blobs: dict[str, int] = {}  # digest -> size
        self.created: list[dict] = []
        self.chats: list[str] = []
        self.chat_requests: list[dict] = []

    def __call__(self, method: str, path: str, headers, body: bytes):
        blob = re.fullmatch(r"/api/blobs/(sha256:[0-9a-f]{64})", path)
        if blob and method == "HEAD":
            return json_reply(200 if blob.group(1) in self.blobs else 404, {})
        if blob and method == "POST":
            if "sha256:" + hashlib.sha256(body).hexdigest() != blob.group(1):
                return json_reply(400, {"error": "digest mismatch"})
            self.blobs[blob.group(1)] = len(body)
            return json_reply(201, {})
        if (method, path) == ("GET", "/api/tags"):
            return json_reply(200, {"models": [{"name": m, "model": m} for m in self.models]})
        if (method, path) == ("POST", "/api/create"):
            return self.create(json.loads(body))
        if (method, path) == ("POST", "/api/chat"):
            return self.chat(json.loads(body))
        return json_reply(404, {"error": f"{method} {path} not found"})

    def create(self, request: dict):
        problem = (
            (set(request) - CREATE_FIELDS and f"unknown fields {sorted(set(request) - CREATE_FIELDS)}")
            or (not isinstance(request.get("model"), str) and "model is required")
            or (("from" in request) == ("files" in request) and "give exactly one of from and files")
            or ("from" in request and request["from"] not in self.models and f"model {request['from']} not found")
            or (any(d not in self.blobs for d in request.get("files", {}).values()) and "a file blob is missing")
            or (any(d not in self.blobs for d in request.get("adapters", {}).values()) and "an adapter blob is missing")
            or (not isinstance(request.get("parameters", {}), dict) and "parameters must be an object")
        )
        if problem:
            return json_reply(400, {"error": problem})
        self.created.append(request)
        self.models.append(request["model"])
        return json_reply(200, {"status": "success"})

    def chat(self, request: dict):
        if request.get("model") not in self.models:
            return json_reply(404, {"error": f"model '{request.get('model')}' not found"})
        if not isinstance(request.get("messages"), list) or not request["messages"]:
            return json_reply(400, {"error": "messages are required"})
        self.chats.append(request["model"])
        self.chat_requests.append(request)
        n = len(self.chats)
        answer = f"I hear you ({n}). Please stay safe and talk to someone you trust; a doctor can help too."
        return json_reply(200, {"model": request["model"], "message": {"role": "assistant", "content": answer},
                                "done": True, "eval_count": 20})  # fmt: skip
