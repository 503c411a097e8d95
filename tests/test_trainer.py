"""train_local.py, run as a user runs it, on a tiny Llama built here (and, marked slow, on SmolLM2-135M)."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import saige_db
from conftest import ROOT, cpu_computes_bf16, run

SCRIPT = "train_local.py"


@pytest.fixture(scope="session")
def saige_data(tmp_path_factory) -> Path:
    """A small SAIGE database: 24 experiences over the bank's first scenarios, all passing the thresholds."""
    folder = tmp_path_factory.mktemp("data")
    db = folder / "saige.db"
    conn = saige_db.create(db)
    bank = json.loads((ROOT / "data" / "scenarios.json").read_text())[:12]
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
            for i in range(2):
                saige_db.add_experience(
                    conn,
                    sid,
                    s["expected_response"] if i else "Thank you. I'm here to help.",
                    0.1,
                    dict.fromkeys(saige_db.WEIGHTS, 8.0),
                )
    conn.close()
    return db


def convert(db: Path, out: Path, *args: str) -> Path:
    result = run("saige_to_sft.py", "--db", db, "-o", out, "-q", *args)
    assert result.returncode == 0, result.stderr
    return out


def train(data: Path, model: Path, out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run(
        SCRIPT,
        "--data",
        data,
        "--model",
        model,
        "--output-dir",
        out,
        "--batch-size",
        "4",
        "--max-length",
        "1024",
        "-q",
        *args,
        timeout=timeout,
    )


def dry_run(data: Path, model: Path, out: Path, *args: str) -> list[dict]:
    result = train(data, model, out, "--dry-run", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["tokens"]


MARKER = {
    "tinyllama": "<|assistant|>\n",
    "mistral": "[/INST]",
    "llama3": "<|end_header_id|>\n\n",
    "chatml": "<|im_start|>assistant\n",
}
ANSWER_END = {"tinyllama": "</s>", "mistral": "</s>", "llama3": "<|eot_id|>", "chatml": "<|im_end|>"}


def formats(names: list[str]) -> list:
    """The offline default's format (chatml) in the default suite, the others in the slow one (CI runs both): each
    trains a tiny model for 7-14 s, and the default suite is kept near 10 minutes."""
    return [name if name == "chatml" else pytest.param(name, marks=pytest.mark.slow) for name in names]


@pytest.mark.parametrize("fmt", formats(sorted(ANSWER_END)))
def test_loss_is_on_the_answer_and_its_end_token_only(saige_data, tiny_model, tmp_path, fmt):
    data = convert(saige_data, tmp_path / "train.csv", "--format", fmt, "--limit", "1")
    tokens = dry_run(data, tiny_model, tmp_path / "out", "--eval-split", "0")
    trained = "".join(t["token"] for t in tokens if t["trained"])
    untrained = "".join(t["token"] for t in tokens if not t["trained"])
    first = [t["trained"] for t in tokens].index(True)
    assert all(t["trained"] for t in tokens[first:]), "the answer is one trained run up to the end"
    with open(data, newline="", encoding="utf-8") as f:
        text = next(csv.DictReader(f))["text"]
    answer = text[text.rfind(MARKER[fmt]) + len(MARKER[fmt]) :]
    # exactly the answer and its end token, plus the tokenizer's EOS when the format ends otherwise ("</s>" here)
    assert trained == answer.rstrip() + ("" if answer.rstrip().endswith("</s>") else "</s>")
    assert trained.count(ANSWER_END[fmt]) == 1 and trained.endswith("</s>")  # the end is learned, once
    assert "[Person's state" not in trained and "You are a wise" in untrained or fmt == "mistral"
    assert untrained.count("<s>") <= 1  # no doubled BOS when the text already starts with it


@pytest.mark.parametrize(
    "layout_args, expected_layout",
    [
        (["--output-format", "jsonl", "--layout", "messages"], "conversational prompt-completion"),
        (["--output-format", "jsonl", "--layout", "prompt-completion"], "prompt-completion (loss on the answer only)"),
    ],
)
def test_jsonl_layouts_are_masked_too(saige_data, tiny_model, tmp_path, layout_args, expected_layout):
    data = convert(saige_data, tmp_path / "train.jsonl", "--format", "chatml", "--limit", "1", *layout_args)
    result = train(data, tiny_model, tmp_path / "out", "--dry-run", "--eval-split", "0")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["layout"] == expected_layout
    trained = "".join(t["token"] for t in report["tokens"] if t["trained"])
    assert "<|im_end|>" in trained[-14:] and "<|im_start|>" not in trained


@pytest.mark.parametrize("fmt", formats(["chatml", "llama3"]))
def test_an_answer_cut_by_the_generation_limit_teaches_its_text_but_not_a_stop(tmp_path, tiny_model, fmt):
    db = tmp_path / "saige.db"
    conn = saige_db.create(db)
    with conn:
        sid = saige_db.add_scenario(conn, "I feel dizzy after my new pills.")
        cut = "Please sit down and rest. Call your pharmacist today and ask whether the new pills can cause"
        saige_db.add_experience(conn, sid, cut, 0.1, dict.fromkeys(saige_db.WEIGHTS, 8.0))
    conn.close()
    closed = convert(db, tmp_path / "closed.csv", "--format", fmt, "--trim-unfinished")
    opened = convert(db, tmp_path / "open.csv", "--format", fmt, "--trim-unfinished", "--open-unfinished")
    for data, stops in ((closed, True), (opened, False)):
        tokens = dry_run(data, tiny_model, tmp_path / "out", "--eval-split", "0")
        trained = "".join(t["token"] for t in tokens if t["trained"])
        assert trained.startswith("Please sit down and rest.")
        assert trained.endswith("Call your pharmacist today") is False  # trimmed back to the last full sentence
        assert trained.endswith("</s>") is stops, trained  # the tiny tokenizer's EOS: learned only when closed
        assert (ANSWER_END[fmt] in trained) is stops
        assert tokens[-1]["token"] == "</s>"  # the open answer still ends in EOS, only out of the loss


def test_train_on_prompt_trains_every_token(saige_data, tiny_model, tmp_path):
    data = convert(saige_data, tmp_path / "train.csv", "--format", "chatml", "--limit", "1")
    tokens = dry_run(data, tiny_model, tmp_path / "out", "--train-on-prompt", "--eval-split", "0")
    assert all(t["trained"] for t in tokens[1:])


DEPLOYED = [
    "adapter_model.safetensors",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "training_args.bin",
    "saige_data.meta.json",
    "training_summary.json",
]


@pytest.mark.parametrize("fmt", formats(["mistral", "chatml", "tinyllama"]))
def test_training_writes_the_files_users_deploy(saige_data, tiny_model, tmp_path, fmt):
    data = convert(saige_data, tmp_path / "train.csv", "--format", fmt)
    out = tmp_path / "adapter"
    result = train(data, tiny_model, out, "--max-steps", "4")
    assert result.returncode == 0, result.stderr
    for name in DEPLOYED:
        assert (out / name).is_file(), name
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (out / "tokenizer_config.json").read_text()
    assert not list(out.glob("checkpoint-*"))
    report = json.loads((out / "training_summary.json").read_text())
    assert report["steps"] == 4 and report["train_rows"] + report["eval_rows"] == 24
    assert report["tokens"] > 0 and report["tokens_per_second"] > 0 and report["peak_rss_mb"] > 0
    assert report["format"] == fmt and set(report["versions"]) >= {"torch", "transformers", "trl", "peft"}

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    tok = AutoTokenizer.from_pretrained(out)
    generated = model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > 1


def test_cpu_memory_settings_leave_the_losses_as_they_were(saige_data, tiny_model, tmp_path):
    """On a CPU, gradient checkpointing is on by default, with a fixed malloc threshold and a small LM-head chunk
    (fit_cpu_memory): less memory, the same numbers."""
    data = convert(saige_data, tmp_path / "train.csv")
    reports = []
    for name, extra in (("default", []), ("plain", ["--no-gradient-checkpointing"])):
        result = train(data, tiny_model, tmp_path / name, "--max-steps", "4", "--logging-steps", "1", *extra)
        assert result.returncode == 0, result.stderr
        reports.append(json.loads((tmp_path / name / "training_summary.json").read_text()))
    default, plain = reports
    assert default["args"]["gradient_checkpointing"] is True and plain["args"]["gradient_checkpointing"] is False
    losses = [[h["loss"] for h in r["loss_history"] if "loss" in h] for r in reports]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_bf16_on_a_cpu_that_has_it(saige_data, tiny_model, tmp_path):
    data = convert(saige_data, tmp_path / "train.csv")
    result = train(data, tiny_model, tmp_path / "out", "--max-steps", "2", "--precision", "bf16")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    expected = "bf16" if cpu_computes_bf16() else "fp32"
    assert report["precision"] == expected and report["final_train_loss"] is not None
    assert report["final_train_loss"] == report["final_train_loss"]  # not NaN


def test_precision_auto_is_bf16_on_a_cpu_that_computes_it(saige_data, tiny_model, tmp_path):
    data = convert(saige_data, tmp_path / "train.csv")
    result = train(data, tiny_model, tmp_path / "out", "--max-steps", "1", "--eval-split", "0")  # no GPU here
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    expected = "bf16" if cpu_computes_bf16() else "fp32"
    assert report["precision"] == expected and report["args"]["precision"] == "auto"


@pytest.mark.parametrize("layout", ["messages", "prompt-completion"])
def test_jsonl_layouts_train(saige_data, tiny_model, tmp_path, layout):
    data = convert(saige_data, tmp_path / "train.jsonl", "--output-format", "jsonl", "--layout", layout)
    result = train(data, tiny_model, tmp_path / "out", "--max-steps", "2", "--eval-split", "0")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_merge_and_cloudflare_export(saige_data, tiny_model, tmp_path):
    data = convert(saige_data, tmp_path / "train.csv", "--format", "llama3")
    out = tmp_path / "adapter"
    result = train(
        data,
        tiny_model,
        out,
        "--max-steps",
        "2",
        "--lora-rank",
        "8",
        "--merge",
        "--export",
        "cloudflare",
        "--cloudflare-base",
        "@cf/meta-llama/llama-2-7b-chat-hf-lora",
    )
    assert result.returncode == 0, result.stderr
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "merged").config.num_hidden_layers == 2
    export = out / "cloudflare"
    assert sorted(p.name for p in export.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["model_type"] == "llama" and config["r"] <= 8
    assert "wrangler ai finetune create @cf/meta-llama/llama-2-7b-chat-hf-lora" in result.stderr


def test_cloudflare_export_refuses_rank_over_limit_before_training(saige_data, tiny_model, tmp_path):
    data = convert(saige_data, tmp_path / "train.csv")
    result = train(
        data,
        tiny_model,
        tmp_path / "out",
        "--export",
        "cloudflare",
        "--cloudflare-base",
        "@cf/mistral/mistral-7b-instruct-v0.2-lora",
    )
    assert result.returncode == 2
    assert "--lora-rank 8" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.slow  # a whole training run or pipeline: `make test-slow` (CI runs both)
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(saige_data, tiny_model, tmp_path):
    data = convert(saige_data, tmp_path / "train.csv", "--format", "chatml")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(ROOT / SCRIPT),
        "--data",
        str(data),
        "--model",
        str(tiny_model),
        "--output-dir",
        str(out),
        "--batch-size",
        "1",
        "--max-steps",
        "300",
        "--save-steps",
        "20",
        "--eval-split",
        "0",
        "-q",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (out / "checkpoint-20").exists():  # training is under way
        assert proc.poll() is None and time.monotonic() < deadline, "training never reached step 20"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert steps and steps[-1] < 300, "the interrupted step is saved as a checkpoint"
    result = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 300


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["--data", "missing.csv"], "data file not found", 1),
        (["--use-4bit"], "need a CUDA GPU", 2),
        (["--model", "no/such-model-offline"], "cannot load model", 1),
        (["--model", "missing.gguf"], "model file not found", 1),
        (["--lora-rank", "0"], "must be a positive integer", 2),
        (["--use-4bit", "--use-8bit"], "not allowed with argument", 2),
        (["--no_such_field", "1"], "unrecognized arguments: --no_such_field", 2),
        (["--save_total_limit", "abc"], "invalid int value: 'abc'", 2),
        (["--use_cpu", "true"], "--use_cpu: set here by --precision", 2),
    ],
)
def test_bad_input_is_one_clear_line(saige_data, tiny_model, tmp_path, args, message, code):
    data = convert(saige_data, tmp_path / "train.csv")
    base = ["--data", data, "--model", tiny_model, "--output-dir", tmp_path / "out"]
    result = run(SCRIPT, *base, *args, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == code, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_data_without_usable_column(tiny_model, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\nhi,hello\n")
    result = run(SCRIPT, "--data", bad, "--model", tiny_model, "--output-dir", tmp_path / "out")
    assert result.returncode == 1 and "no 'text', 'messages' or 'prompt'/'completion' column" in result.stderr
    empty = tmp_path / "empty.csv"
    empty.write_text("text\n")
    result = run(SCRIPT, "--data", empty, "--model", tiny_model, "--output-dir", tmp_path / "out")
    assert result.returncode == 1 and "no rows" in result.stderr


@pytest.mark.slow  # a whole training run or pipeline: `make test-slow` (CI runs both)
def test_long_rows_are_truncated_and_counted(saige_data, tiny_model, tmp_path):
    data = convert(saige_data, tmp_path / "train.csv", "--format", "chatml")
    args = ["--data", data, "--model", tiny_model, "--output-dir", tmp_path / "out", "--dry-run"]
    result = run(SCRIPT, *args, "--max-length", "300")
    assert result.returncode == 0, result.stderr
    assert "examples are longer than --max-length 300 and are truncated" in result.stderr
    result = run(SCRIPT, *args, "--max-length", "32")  # nothing of any answer fits
    assert result.returncode == 1 and "raise --max-length" in result.stderr and "Traceback" not in result.stderr


def test_init_adapter_continues_training_the_adapter_it_is_given(saige_data, tiny_model, tmp_path):
    """--init-adapter keeps training an adapter (the pipeline's START_FROM=previous): it starts from that adapter's
    weights (a new adapter's B matrices are zero) and keeps its LoRA settings."""
    from safetensors.torch import load_file

    data = convert(saige_data, tmp_path / "train.csv")
    first = train(data, tiny_model, tmp_path / "first", "--max-steps", "4", "--lora-rank", "4", "--learning-rate",
                  "1e-2")  # fmt: skip
    assert first.returncode == 0, first.stderr
    # one step at a learning rate that moves nothing measurably: the continued adapter is the one it was given
    # and its rank is the adapter's (4), not --lora-rank's default 16, which Workers AI would refuse
    again = train(data, tiny_model, tmp_path / "again", "--max-steps", "1", "--learning-rate", "1e-9",
                  "--init-adapter", tmp_path / "first", "--export", "cloudflare", "--cloudflare-base",
                  "@cf/mistral/mistral-7b-instruct-v0.2-lora")  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / "cloudflare" / "adapter_model.safetensors").is_file()
    assert "continuing the adapter in" in again.stderr
    before, after = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("first", "again"))
    assert set(before) == set(after)
    lora_b = [name for name in before if "lora_B" in name]
    assert lora_b and all(before[name].abs().max() > 1e-3 for name in lora_b)  # trained: not a new adapter's zeros
    assert all((before[name] - after[name]).abs().max() < 1e-5 for name in before)
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["r"] == 4  # not --lora-rank's 16
    used = json.loads((tmp_path / "again" / "training_summary.json").read_text())["args"]
    assert used["init_adapter"] == str(tmp_path / "first")

    clash = train(data, tiny_model, tmp_path / "first", "--init-adapter", tmp_path / "first", "--overwrite")
    assert clash.returncode == 2 and "write over the adapter it starts from" in clash.stderr
    not_one = train(data, tiny_model, tmp_path / "x", "--init-adapter", tmp_path)
    assert not_one.returncode == 1 and "no adapter_config.json" in not_one.stderr and "Traceback" not in not_one.stderr
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text('{"r": 4,')  # cut short
    broken = train(data, tiny_model, tmp_path / "y", "--init-adapter", tmp_path / "broken", "--export", "cloudflare",
                   "--cloudflare-base", "@cf/mistral/mistral-7b-instruct-v0.2-lora")  # fmt: skip
    assert broken.returncode == 1 and "cannot read its adapter_config.json" in broken.stderr
    assert "Traceback" not in broken.stderr and not (tmp_path / "y").exists()


def test_refuses_to_overwrite_a_finished_adapter(saige_data, tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"x")
    data = convert(saige_data, tmp_path / "train.csv")
    result = train(data, tiny_model, out, "--max-steps", "1")
    assert result.returncode == 1 and "--overwrite" in result.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == b"x"


def test_help_lists_every_flag():
    result = run(SCRIPT, "--help")
    assert result.returncode == 0
    for flag in [
        "--data",
        "--model",
        "--use-4bit",
        "--use-8bit",
        "--lora-rank",
        "--lora-alpha",
        "--epochs",
        "--batch-size",
        "--learning-rate",
        "--output-dir",
        "--max-length",
        "--packing",
        "--gradient-accumulation-steps",
        "--gradient-checkpointing",
        "--lora-dropout",
        "--target-modules",
        "--warmup-ratio",
        "--lr-scheduler",
        "--seed",
        "--eval-split",
        "--save-steps",
        "--resume",
        "--max-steps",
        "--report-to",
        "--bf16",
        "--fp16",
        "--merge",
        "--export",
        "--train-on-prompt",
        "--overwrite",
        "--trust-remote-code",
        "--allow-cpu-fallback",
        "--dry-run",
        "pip install",
    ]:
        assert flag in result.stdout, flag
    assert "TinyLlama/TinyLlama-1.1B-Chat-v1.0" in result.stdout and "./saige-finetuned" in result.stdout


@pytest.mark.slow
def test_smollm2_loss_falls(tmp_path, saige_data):
    data = convert(saige_data, tmp_path / "train.csv", "--format", "chatml")
    out = tmp_path / "smol"
    result = run(
        SCRIPT,
        "--data",
        data,
        "--model",
        "offline",
        "--output-dir",
        out,
        "--max-steps",
        "12",
        "--batch-size",
        "4",
        "--learning-rate",
        "1e-3",
        "--logging-steps",
        "1",
        "--eval-split",
        "0",
        "-q",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    history = [
        h["loss"] for h in json.loads((out / "training_summary.json").read_text())["loss_history"] if "loss" in h
    ]
    assert sum(history[-3:]) / 3 < sum(history[:3]) / 3


def test_recipe_sets_flags_and_the_command_line_wins(saige_data, tiny_model, tmp_path):
    data = convert(saige_data, tmp_path / "train.csv")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 1\nlora_rank: 4\nlora-alpha: 8\nmax-steps: 2\nno-group-by-length: true\nbf16: false\n")
    out = tmp_path / "out"
    result = train(data, tiny_model, out, "--config", str(recipe), "--lora-rank", "2")
    assert result.returncode == 0, result.stderr
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["lora_alpha"] == 8
    used = json.loads((out / "training_summary.json").read_text())["args"]
    assert used["epochs"] == 1 and used["max_steps"] == 2 and used["group_by_length"] is False


def test_trl_names_and_any_other_trl_field_pass_through(saige_data, tiny_model, tmp_path):
    """TRL's spelling of our flags works, and a field we have no flag for reaches TRL's config or its ModelConfig
    (recipe, then the command line, which wins)."""
    torch = pytest.importorskip("torch")
    data = convert(saige_data, tmp_path / "train.csv")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("weight_decay: 0.5\nadam_beta2: 0.99\nlora_r: 4\nuse_rslora: true\n")
    out = tmp_path / "out"
    result = train(data, tiny_model, out, "--config", str(recipe), "--num_train_epochs", "1", "--max_steps=2",
                   "--weight_decay", "0.01", "--save-total-limit", "1",
                   "--lora_modules_to_save", "lm_head", "--target-modules", "q_proj")  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = torch.load(out / "training_args.bin", weights_only=False)
    assert (config.num_train_epochs, config.max_steps, config.save_total_limit) == (1, 2, 1)
    assert (config.weight_decay, config.adam_beta2) == (0.01, 0.99)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["use_rslora"] is True and adapter["modules_to_save"] == ["lm_head"]
    assert adapter["target_modules"] == ["q_proj"]  # one module by name, not a regex that matches nothing
    used = json.loads((out / "training_summary.json").read_text())["args"]
    assert used["epochs"] == 1 and used["trl_fields"] == {
        "adam_beta2": 0.99,
        "weight_decay": 0.01,
        "save_total_limit": 1,
    }
    assert used["model_fields"] == {"use_rslora": True, "lora_modules_to_save": ["lm_head"]}


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "epochs: 1\nlearning_rat: 0.1\n",
            "unrecognized arguments: --learning_rat (not a flag, nor a field of SFTConfig or ModelConfig)",
        ),
        ("save_total_limit: many\n", "invalid int value: 'many'"),
        ("dtype: float16\n", "--dtype: set here by --precision"),
        ("epochs: -1\n", "--config"),
        ("packing: maybe\n", "expected true or false"),
        ("method: sideways\n", "is not one of"),
        ("- epochs\n", "expected a mapping"),
        ("epochs: [1\n", "cannot read it as YAML"),
    ],
)
def test_bad_recipe_is_one_line_before_loading_anything(tmp_path, text, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    args = ("--data", "missing.csv", "--model", "no-such-model", "--output-dir", str(out))
    result = run(SCRIPT, "--config", str(recipe), *args)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]  # argparse's usage, then the one error line
    assert last.startswith("train_local.py: error: --config") and message in last and not out.exists()


def test_demo_recipe_matches_the_demo():
    import yaml

    recipe = yaml.safe_load((ROOT / "examples" / "recipes" / "demo-sft.yaml").read_text())
    make = subprocess.run(["make", "-s", "demo-settings"], cwd=ROOT, capture_output=True, text=True, check=True)
    demo = dict(item.split("=", 1) for item in make.stdout.split())
    pipeline = (ROOT / "train_pipeline.sh").read_text()
    assert recipe["model"] == "offline" and recipe["method"] == "sft"
    assert recipe["epochs"] == int(demo["EPOCHS"])
    for key, name in (("batch-size", "BATCH_SIZE"), ("learning-rate", "LEARNING_RATE"), ("lora-rank", "LORA_RANK")):
        default = demo.get(name) or re.search(rf'"{name}\|([^|]*)\|', pipeline).group(1)
        assert float(recipe[key]) == float(default), name


@pytest.mark.slow
def test_two_processes_dequantize_the_gguf_once(tmp_path):
    """Ranks of `accelerate launch` (or two runs) asking for the same GGUF at once: one builds the cache, the
    other waits and reuses it; no half-written folder is ever visible."""
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import train_local as t; "
        "print(t.dequantized_copy(Path(t.offline_model_path())))"
    )
    env = {**os.environ, "SAIGE_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(ROOT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    folders = {out.strip() for out, _ in results}
    assert len(folders) == 1 and (Path(folders.pop()) / "config.json").is_file()
    assert sum(err.count("dequantizing") for _, err in results) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name] == []
