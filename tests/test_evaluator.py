"""test_model.py, run as a user runs it: tiny models answer, a real local worker on loopback scores."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest
from conftest import ROOT, cpu_computes_bf16, run, start_worker

sys.path.insert(0, str(ROOT))
import saige_to_sft  # noqa: E402
import test_model  # noqa: E402

SCRIPT = "test_model.py"


def evaluate(*args, timeout: float = 300, **kwargs):
    return run(SCRIPT, "--max-new-tokens", "8", "-q", *args, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def second_model(tiny_model, tmp_path_factory) -> Path:
    """Another tiny model: same tokenizer, different weights, so a comparison has two sides."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("second")
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(tiny_model).config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", header[16:24])


def test_report_json_and_plot(tiny_model, worker_url, tmp_path):
    out = {"report": tmp_path / "report.md", "json": tmp_path / "results.json", "plot": tmp_path / "results.png"}
    result = evaluate(
        "--model",
        tiny_model,
        "--worker-url",
        worker_url,
        "--limit",
        "6",
        "--report",
        out["report"],
        "--json",
        out["json"],
        "--plot",
        out["plot"],
    )
    assert result.returncode == 0, result.stderr
    assert "weighted score (0-10)" in result.stdout and "karuna" in result.stdout
    data = json.loads(out["json"].read_text())
    assert len(data["results"][str(tiny_model)]) == 6
    summary = data["summaries"][str(tiny_model)]
    assert 0 <= summary["weighted_score"] <= 10 and 0 <= summary["total_harm"] <= 1
    assert set(summary) >= {"ahimsa", "sacca", "karuna", "panna", "upekkha", "deception", "distinct2", "mean_words"}
    report = out["report"].read_text()
    assert "| metric |" in report and "the three best answers" in report and "the three worst answers" in report
    assert png_size(out["plot"]) == (900, 700)


def test_compare_pairs_the_same_scenarios(tiny_model, second_model, worker_url, tmp_path):
    out = tmp_path / "results.json"
    result = evaluate(
        "--model",
        tiny_model,
        "--compare",
        second_model,
        "--worker-url",
        worker_url,
        "--limit",
        "5",
        "--json",
        out,
        "--bootstrap",
        "500",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    mine, theirs = data["results"][str(tiny_model)], data["results"][str(second_model)]
    assert [r["scenario_id"] for r in mine] == [r["scenario_id"] for r in theirs]
    comparison = data["comparison"]
    assert comparison["scenarios"] == 5 and comparison["wins"] + comparison["ties"] + comparison["losses"] == 5
    low, high = comparison["ci95"]
    assert low <= comparison["mean_difference"] <= high
    assert "95% CI" in result.stdout and "difference" in result.stdout


def test_previous_pairs_this_run_with_an_earlier_one_without_generating_it_again(tiny_model, worker_url, tmp_path):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    common = ("--worker-url", worker_url, "--limit", "4", "--samples", "2", "--temperature", "0.7")
    assert evaluate("--model", tiny_model, *common, "--json", first).returncode == 0
    result = evaluate("--model", tiny_model, *common, "--json", second, "--previous", first)
    assert result.returncode == 0, result.stderr
    previous = json.loads(second.read_text())["previous"]
    assert previous["model"] == str(tiny_model) and previous["eval"] == str(first)
    # the same model and seed answer the same: every scenario ties, the difference is exactly zero
    assert previous["comparison"]["scenarios"] == 4 and previous["comparison"]["ties"] == 4
    assert previous["comparison"]["mean_difference"] == 0 and f"against {tiny_model}" in result.stdout
    assert "previous_run" not in json.loads(second.read_text())["config"]


def test_every_judge_scores_the_same_answers(tiny_model, second_model, worker_url, tmp_path):
    """A second worker (--judge) and chrF against expected_response see the same answers. Here the judge runs the
    same scorer, so it must agree exactly: scoring inline (a judge) and by id (the trained-against worker) match."""
    out, report = tmp_path / "results.json", tmp_path / "report.md"
    with start_worker(tmp_path / "judge.db") as judge:
        args = ("--model", tiny_model, "--compare", second_model, "--worker-url", worker_url, "--judge", judge)
        result = evaluate(*args, "--limit", "4", "--json", out, "--report", report, "--bootstrap", "300")
    assert result.returncode == 0, result.stderr
    judges = json.loads(out.read_text())["judges"]
    assert list(judges) == [worker_url, judge, "chrF vs expected_response"]
    trained, other, chrf = judges.values()
    assert trained["trained_against"] and not other["trained_against"]
    assert other["means"] == pytest.approx(trained["means"])
    assert other["comparison"]["mean_difference"] == pytest.approx(trained["comparison"]["mean_difference"])
    assert chrf["scale"] == "0-100" and all(0 <= x <= 100 for x in chrf["means"].values())
    assert chrf["comparison"]["scenarios"] == 4
    assert f"judge {judge}:" in result.stdout and "judge chrF vs expected_response:" in result.stdout
    assert "Every judge on the same answers" in report.read_text()


def test_a_judge_that_can_only_store_is_refused_before_generating(tiny_model, worker_url, tmp_path):
    with start_worker(tmp_path / "real.db", "--strict-contract") as real:
        result = evaluate("--model", tiny_model, "--worker-url", worker_url, "--judge", real, timeout=60)
    assert result.returncode == 1 and "has no /api/score" in result.stderr and result.stderr.count("\n") == 1
    bad = evaluate("--model", tiny_model, "--judge", "ftp://x")
    assert bad.returncode == 2 and "--judge must be an http" in bad.stderr


def test_heldout_split_is_the_default_suite(tiny_model, worker_url, tmp_path):
    import requests

    heldout = {
        s["id"] for s in requests.get(f"{worker_url}/api/scenarios", params={"split": "heldout"}).json()["scenarios"]
    }
    out = tmp_path / "r.json"
    assert evaluate("--model", tiny_model, "--worker-url", worker_url, "--json", out).returncode == 0
    ids = {r["scenario_id"] for r in json.loads(out.read_text())["results"][str(tiny_model)]}
    assert ids == heldout


def test_suite_file_with_bad_rows(tiny_model, worker_url, tmp_path):
    suite = tmp_path / "suite.jsonl"
    good = {
        "context": "Hello there!",
        "person_state": {"vulnerability": "low", "mood": "neutral"},
        "facts": [],
        "critical_info": [],
        "harm_type": "none",
        "difficulty_level": 1,
    }
    suite.write_text("\n".join([json.dumps(good), "{not json", json.dumps({"context": ""}), json.dumps(good)]) + "\n")
    out = tmp_path / "r.json"
    result = evaluate("--model", tiny_model, "--worker-url", worker_url, "--suite", suite, "--json", out)
    assert result.returncode == 0, result.stderr
    assert "skipped 2 suite rows" in result.stderr
    assert len(json.loads(out.read_text())["results"][str(tiny_model)]) == 2


def test_empty_answers_are_scored_and_counted(tiny_model, worker_url, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    silent = tmp_path / "silent"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.lm_head.weight.data.zero_()
    model.lm_head.weight.data[AutoTokenizer.from_pretrained(tiny_model).bos_token_id] = 1.0  # only "<s>": empty text
    model.save_pretrained(silent)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(silent)
    out = tmp_path / "r.json"
    result = evaluate("--model", silent, "--worker-url", worker_url, "--limit", "3", "--json", out)
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.read_text())["summaries"][str(silent)]
    assert summary["empty_answers"] == 3 and summary["weighted_score"] < 2


def test_fail_below_gates(tiny_model, worker_url):
    result = evaluate("--model", tiny_model, "--worker-url", worker_url, "--limit", "2", "--fail-below", "9.9")
    assert result.returncode == 1 and "below --fail-below 9.9" in result.stderr


def test_adapter_with_missing_base_names_it(tiny_model, worker_url, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/nowhere/base.gguf"}))
    result = evaluate("--model", adapter, "--worker-url", worker_url)
    assert result.returncode == 1
    assert (
        "/nowhere/base.gguf" in result.stderr and "--base-model" in result.stderr and "Traceback" not in result.stderr
    )


@pytest.mark.parametrize(
    "model, message",
    [("/no/such/model-dir", "cannot load"), ("missing.gguf", "model file not found")],
)
def test_missing_model(worker_url, model, message):
    result = evaluate("--model", model, "--worker-url", worker_url, "--limit", "1")
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_directory_that_is_not_a_model(worker_url, tmp_path):
    result = evaluate("--model", tmp_path, "--worker-url", worker_url, "--limit", "1")
    assert result.returncode == 1 and "is not a model" in result.stderr


def test_worker_unreachable_says_how_to_start_it(tiny_model):
    result = evaluate("--model", tiny_model, "--worker-url", "http://127.0.0.1:9")
    assert result.returncode == 3  # worker unreachable: 3, as in the collector and the trainer
    assert "python saige_worker.py --db ./saige.db --init" in result.stderr and "Traceback" not in result.stderr


def test_empty_suite(tiny_model, worker_url):
    result = evaluate("--model", tiny_model, "--worker-url", worker_url, "--scenario-ids", "999999")
    assert result.returncode == 1 and "the suite is empty" in result.stderr


def test_one_prompt_mode(tiny_model, worker_url):
    result = evaluate("--model", tiny_model, "--worker-url", worker_url, "--prompt", "Hello!")
    assert result.returncode == 0, result.stderr
    assert "weighted" in result.stderr


def test_samples_need_temperature(tiny_model):
    result = evaluate("--model", tiny_model, "--samples", "3")
    assert result.returncode == 2 and "--temperature" in result.stderr


def test_a_sidecar_prompt_gets_the_bos_token_training_gave_it(tiny_model):
    """The converter's templates carry no BOS and the trainer's tokenizer adds one; the evaluator once never added
    it, so for tokenizers that add BOS (Llama, Mistral, TinyLlama) it prompted differently from training."""
    import inspect

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    prompt = "[INST] I feel lost. [/INST]"
    trained = tok(prompt)["input_ids"]  # what SFTTrainer saw: the tokenizer's own special tokens
    assert trained[0] == bos
    assert test_model.encode_prompts(tok, [prompt], from_sidecar=True)["input_ids"][0].tolist() == trained
    assert test_model.encode_prompts(tok, ["<s>" + prompt], from_sidecar=True)["input_ids"][0].tolist() == trained
    assert test_model.encode_prompts(tok, [prompt], from_sidecar=False)["input_ids"][0].tolist() == trained[1:]
    assert "encode_prompts(" in inspect.getsource(test_model.generate)


def test_prompt_matches_the_converter():
    assert test_model.DEFAULT_SYSTEM_PROMPT == saige_to_sft.DEFAULT_SYSTEM_PROMPT
    state = {"vulnerability": "high", "mood": "anxious"}
    assert test_model.user_turn(" Help me. ", state) == saige_to_sft.user_turn(" Help me. ", state)
    assert test_model.DEFAULT_WORKER_URL == "http://localhost:8787"


def test_models_served_by_ollama_are_evaluated_by_name(worker_url, tmp_path):
    from fault_worker import serve
    from ollama_stub import OllamaStub

    stub = OllamaStub(["tinyllama:1.1b", "saige-tuned:iter-1"])
    out = tmp_path / "results.json"
    with serve(stub) as url:
        result = evaluate("--backend", "ollama", "--ollama-url", url, "--model", "saige-tuned:iter-1", "--compare",
                          "tinyllama:1.1b", "--worker-url", worker_url, "--limit", "3", "--json", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert sorted(data["results"]) == ["saige-tuned:iter-1", "tinyllama:1.1b"]
    assert all(r["answer"].startswith("I hear you") and "outcome" in r for rs in data["results"].values() for r in rs)
    assert data["comparison"]["scenarios"] == 3
    assert stub.chats == ["saige-tuned:iter-1"] * 3 + ["tinyllama:1.1b"] * 3
    first = stub.chat_requests[0]
    assert first["stream"] is False and first["options"]["num_predict"] == 8  # evaluate() passes --max-new-tokens 8
    assert [m["role"] for m in first["messages"]] == ["system", "user"]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--model", "missing:tag"], 1, "'missing:tag' is not served (it serves: tinyllama:1.1b)"),
        (["--model", "offline"], 2, "give the name the server serves the model under"),
        (["--model", "tinyllama:1.1b", "--base-model", "x"], 2, "--base-model loads a model here"),
    ],
)
def test_a_served_model_is_checked_before_any_generation(worker_url, args, code, message):
    from fault_worker import serve
    from ollama_stub import OllamaStub

    stub = OllamaStub(["tinyllama:1.1b"])
    with serve(stub) as url:
        result = evaluate("--backend", "ollama", "--ollama-url", url, "--worker-url", worker_url, *args)
    assert result.returncode == code and message in result.stderr, result.stderr
    assert message in result.stderr.strip().splitlines()[-1] and not stub.chats


def test_a_server_that_does_not_answer_exits_4(worker_url):
    result = evaluate("--backend", "openai", "--api-base", "http://127.0.0.1:9/v1", "--model", "m",
                      "--worker-url", worker_url)  # fmt: skip
    assert result.returncode == 4 and "nothing answers at http://127.0.0.1:9/v1/models" in result.stderr


def test_help_lists_every_flag():
    result = run(SCRIPT, "--help")
    assert result.returncode == 0
    for flag in [
        "--model",
        "--base-model",
        "--compare",
        "--worker-url",
        "--split",
        "--samples",
        "--max-new-tokens",
        "--report",
        "--json",
        "--plot",
        "--suite",
        "--scenario-ids",
        "--prompt",
        "--temperature",
        "--fail-below",
        "--seed",
        "--bootstrap",
        "--judge",
        "--db",
        "--heldout-fraction",
        "--backend",
        "--api-base",
        "--ollama-url",
    ]:
        assert flag in result.stdout, flag


@pytest.mark.slow
def test_smollm2_on_ten_heldout_scenarios(worker_url, tmp_path):
    out = tmp_path / "smol.json"
    result = run(
        SCRIPT,
        "--model",
        "offline",
        "--worker-url",
        worker_url,
        "--limit",
        "10",
        "--max-new-tokens",
        "64",
        "--json",
        out,
        "-q",
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.read_text())["summaries"]["offline"]
    assert summary["answers"] == 10 and summary["empty_answers"] < 10


def test_degenerate_text_is_flagged_beside_an_improvement():
    fluent = "I am sorry to hear that. Please call your doctor today and tell them what happened."
    loop = "call your doctor call your doctor call your doctor call your doctor call your doctor"
    assert test_model.mean_distinct2([fluent]) == 1.0 and test_model.mean_distinct2([loop]) < 0.4
    # per answer, so the figure of a fluent model does not fall as the suite grows
    assert test_model.mean_distinct2([fluent] * 50) == 1.0

    def summary(answers):
        return {"answers": len(answers), "distinct2": test_model.mean_distinct2(answers),
                "mean_words": sum(len(a.split()) for a in answers) / len(answers)}  # fmt: skip

    assert test_model.degenerate_warning({"tuned": summary([fluent]), "base": summary([fluent])}) is None
    warning = test_model.degenerate_warning({"tuned": summary([loop]), "base": summary([fluent])})
    assert warning.startswith("warning: tuned's answers look degenerate (repetitive: distinct-2")
    flat = "I hear you. I hear you. I hear you, and I am here. Please call your doctor today."
    assert "more repetitive" in test_model.degenerate_warning({"tuned": summary([flat]), "base": summary([fluent])})
    padded = " ".join(f"{fluent} Also, {i}." for i in range(4))  # fluent but four times as long
    assert "words on average against" in test_model.degenerate_warning(
        {"tuned": summary([padded]), "b": summary([fluent])}
    )


def test_precision_auto_is_bf16_where_the_cpu_computes_it(tiny_model, worker_url, tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = evaluate("--model", tiny_model, "--worker-url", worker_url, "--limit", "2", "--json", out, env=env)
    assert result.returncode == 0, result.stderr
    expected = "bf16" if cpu_computes_bf16() else "fp32"
    assert json.loads(out.read_text())["config"]["precision_used"] == expected


def test_precision_bf16_answers_and_fp16_is_refused_on_a_cpu(tiny_model, worker_url, tmp_path):
    out = tmp_path / "results.json"
    result = evaluate("--model", tiny_model, "--worker-url", worker_url, "--limit", "3", "--precision", "bf16",
                      "--json", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(json.loads(out.read_text())["results"][str(tiny_model)]) == 3
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    fp16 = evaluate("--model", tiny_model, "--worker-url", worker_url, "--precision", "fp16", env=env)
    assert fp16.returncode == 1 and "--precision fp16 needs a GPU" in fp16.stderr
    bad = evaluate("--model", tiny_model, "--precision", "fp8")
    assert bad.returncode == 2 and "--precision" in bad.stderr


def test_length_sorted_batches_answer_in_the_input_order(tiny_model):
    """Prompts of different lengths, in two orders: each prompt gets the same answer either way, in its place."""
    from argparse import Namespace

    model, tokenizer, template = test_model.load_model(str(tiny_model), None, "cpu", "fp32")
    contexts = ["Hi!", "I feel alone today and I do not know who to call.", "Can you help?", "My friend is sad."]
    prompts = [test_model.render_prompt(tokenizer, template, "Be kind.", c) for c in contexts]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert len(set(lengths)) == len(lengths)  # distinct lengths: the same batches whatever the input order
    args = Namespace(batch_size=2, temperature=0, top_p=0.9, max_new_tokens=6, quiet=True)
    answers = test_model.generate(model, tokenizer, template, prompts, args, "cpu")
    backwards = test_model.generate(model, tokenizer, template, prompts[::-1], args, "cpu")
    assert answers == backwards[::-1] and len(answers) == 4
    assert test_model.length_sorted(lengths, 2) == [sorted(range(4), key=lengths.__getitem__)[:2],
                                                    sorted(range(4), key=lengths.__getitem__)[2:]]  # fmt: skip
