"""train_local.py --export gguf / ollama: a real short training, the adapter read back with gguf.GGUFReader and
checked against peft's own tensors (names, shapes, llama.cpp's q/k row permutation), and the Ollama Modelfile.
llama.cpp itself is not run here: tests/test_llamacpp.py does (slow, with requirements-llamacpp.txt)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run
from test_trainer import convert, saige_data, train  # noqa: F401 - saige_data is a fixture used below

SCRIPT = "train_local.py"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_CPP_NAMES = {  # HF module -> llama.cpp tensor (what gguf's TensorNameMap gives; written out to check it)
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py), written again here: within each head, the first and
    second halves of the rows (HF's rotary layout) become interleaved pairs (llama.cpp's)."""
    head_dim = rows.shape[0] // n_head
    out = np.empty_like(rows)
    for h in range(n_head):
        block = rows[h * head_dim : (h + 1) * head_dim]
        half = head_dim // 2
        out[h * head_dim : (h + 1) * head_dim : 2] = block[:half]
        out[h * head_dim + 1 : (h + 1) * head_dim : 2] = block[half:]
    return out


def model_like(tiny_model: Path, folder: Path, kind: str) -> Path:
    """A tiny model with the conftest tokenizer: a Llama with grouped-query attention (4 heads, 2 KV heads, so the
    k_proj permutation uses the KV head count), a Qwen2, or a GPT-2 (an architecture the export refuses)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tok = PreTrainedTokenizerFast.from_pretrained(tiny_model)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, **ids))
    else:
        classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
        config_class, model_class = classes[kind]
        config = config_class(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            **ids,
        )
        model = model_class(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def read_gguf(path: Path) -> tuple[dict, dict]:
    """(metadata, tensors) of a GGUF file; tensors as numpy arrays in numpy order (rows first)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = field.parts[field.data[0]]
        meta[name] = bytes(value).decode() if field.types[0] == GGUFValueType.STRING else value[0].item()
    tensors = {t.name: (np.asarray(t.data), t.tensor_type.name, [int(n) for n in t.shape]) for t in reader.tensors}
    return meta, tensors


def peft_tensors(out: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def check_adapter(gguf_path: Path, out: Path, arch: str, n_head: int, n_kv_head: int, permuted: bool) -> None:
    meta, tensors = read_gguf(gguf_path)
    assert meta["general.architecture"] == arch
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == pytest.approx(16.0)  # --lora-alpha 16
    peft = peft_tensors(out)
    expected = {
        f"blk.{layer}.{LLAMA_CPP_NAMES[p]}.weight.lora_{ab}" for layer in range(2) for p in PROJECTIONS for ab in "ab"
    }
    assert set(tensors) == expected
    for layer in range(2):
        for proj in PROJECTIONS:
            group = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{group}.{proj}"
            a, b = peft[f"{key}.lora_A.weight"], peft[f"{key}.lora_B.weight"]
            name = f"blk.{layer}.{LLAMA_CPP_NAMES[proj]}.weight"
            ga, a_type, a_shape = tensors[f"{name}.lora_a"]
            gb, b_type, b_shape = tensors[f"{name}.lora_b"]
            # stored as peft has them (A: rank x in, B: out x rank), f32; GGUF shapes are ggml's ne: [in, rank] and
            # [rank, out], which llama.cpp checks against the base tensor's [in, out]
            assert a_type == b_type == "F32"
            assert ga.shape == a.shape and gb.shape == b.shape, name
            assert a_shape == [a.shape[1], a.shape[0]] and b_shape == [b.shape[1], b.shape[0]]
            assert a.shape[0] == 8  # --lora-rank 8
            np.testing.assert_array_equal(ga, a)  # lora_a is never permuted
            delta, gguf_delta = b @ a, gb @ ga
            assert np.abs(delta).max() > 0, f"{key}: training left B at zero; the check would prove nothing"
            if permuted and proj == "q_proj":
                np.testing.assert_allclose(gguf_delta, permute(delta, n_head), rtol=1e-6, atol=1e-8)
                assert not np.allclose(gguf_delta, delta)
            elif permuted and proj == "k_proj":
                np.testing.assert_allclose(gguf_delta, permute(delta, n_kv_head), rtol=1e-6, atol=1e-8)
                assert not np.allclose(gguf_delta, delta)
            else:
                np.testing.assert_array_equal(gguf_delta, delta)


LORA = ("--max-steps", "2", "--lora-rank", "8", "--lora-alpha", "16", "--learning-rate", "1e-2", "--eval-split", "0")


def modelfile(folder: Path) -> dict:
    """The Modelfile's instructions: {'FROM': ..., 'TEMPLATE': ..., ...}, the triple-quoted values unquoted."""
    text = (folder / "Modelfile").read_text()
    found = {}
    for block in text.split('"""\n'):
        for line in block.splitlines():
            if line.split(" ", 1)[0] in ("FROM", "ADAPTER", "PARAMETER"):
                found[line.split(" ", 1)[0]] = line.split(" ", 1)[1]
        for word in ("TEMPLATE", "SYSTEM"):
            if f'\n{word} """' in "\n" + block:
                found[word] = block.split(f'{word} """', 1)[1].removesuffix('"""')
    return found


def test_llama_gguf_and_ollama_chatml(saige_data, tiny_model, tmp_path):  # noqa: F811 - the imported fixture
    model = model_like(tiny_model, tmp_path / "gqa-llama", "llama")
    data = convert(saige_data, tmp_path / "train.csv", "--format", "chatml")
    out = tmp_path / "adapter"
    result = train(data, model, out, *LORA, "--export", "gguf", "--export", "ollama", "--ollama-base", "smol:135m")
    assert result.returncode == 0, result.stderr
    check_adapter(out / "adapter.gguf", out, "llama", n_head=4, n_kv_head=2, permuted=True)

    folder = out / "ollama"
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "adapter.gguf"]
    assert (folder / "adapter.gguf").read_bytes() == (out / "adapter.gguf").read_bytes()
    found = modelfile(folder)
    assert found["FROM"] == "smol:135m" and found["ADAPTER"] == "./adapter.gguf"
    assert found["TEMPLATE"] == (
        "<|im_start|>system\n{{ .System }}<|im_end|>\n<|im_start|>user\n{{ .Prompt }}<|im_end|>\n"
        "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"
    )
    assert found["SYSTEM"].startswith("You are a wise and compassionate assistant.")
    assert found["PARAMETER"] == 'stop "<|im_end|>"'
    assert f"ollama create saige-lora -f {folder / 'Modelfile'}" in result.stderr
    assert not list(out.glob(".*tmp*"))  # no temporary file or folder left


def test_qwen2_gguf_is_not_permuted(saige_data, tiny_model, tmp_path):  # noqa: F811
    model = model_like(tiny_model, tmp_path / "qwen2", "qwen2")
    data = convert(saige_data, tmp_path / "train.csv", "--format", "chatml")
    out = tmp_path / "adapter"
    result = train(data, model, out, *LORA, "--export", "gguf")
    assert result.returncode == 0, result.stderr
    check_adapter(out / "adapter.gguf", out, "qwen2", n_head=4, n_kv_head=2, permuted=False)
    assert not (out / "ollama").exists()


def test_ollama_alone_for_mistral(saige_data, tiny_model, tmp_path):  # noqa: F811
    """The Mistral layout has no system role: the converter's --system-prompt opens the [INST] block."""
    data = convert(saige_data, tmp_path / "train.csv", "--format", "mistral", "--system-prompt", "Be kind.")
    out = tmp_path / "adapter"
    result = train(data, tiny_model, out, *LORA, "--export", "ollama", "--ollama-base", "mistral:7b")
    assert result.returncode == 0, result.stderr
    assert not (out / "adapter.gguf").exists()  # only the Ollama folder was asked for
    folder = out / "ollama"
    found = modelfile(folder)
    assert found["FROM"] == "mistral:7b" and found["ADAPTER"] == "./adapter.gguf"
    # the prompt as trained: the tiny tokenizer adds no BOS, so the "<s>" in the text stays; the space after
    # [/INST] belongs to the answer's first token (as the trainer splits it), so the prompt ends at "[/INST]"
    assert found["TEMPLATE"] == "<s>[INST] {{ .System }}\n\n{{ .Prompt }} [/INST]{{ .Response }}</s>"
    assert found["SYSTEM"] == "Be kind."
    assert found["PARAMETER"] == 'stop "</s>"'
    meta, tensors = read_gguf(folder / "adapter.gguf")
    assert meta["general.type"] == "adapter" and len(tensors) == 2 * 2 * len(PROJECTIONS)


def test_mistral_without_a_system_prompt_has_no_system_line(saige_data, tiny_model, tmp_path):  # noqa: F811
    """Mistral's layout has no system role: trained without one, the Modelfile sets none."""
    data = convert(saige_data, tmp_path / "train.csv", "--format", "mistral")
    out = tmp_path / "adapter"
    result = train(data, tiny_model, out, *LORA, "--export", "ollama", "--ollama-base", "mistral:7b")
    assert result.returncode == 0, result.stderr
    found = modelfile(out / "ollama")
    assert found["TEMPLATE"] == "<s>[INST] {{ .Prompt }} [/INST]{{ .Response }}</s>"
    assert "SYSTEM" not in found


def refused(result, started: float, out: Path, pattern: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_local.py: error: "), result.stderr
    assert pattern in lines[0]
    assert time.monotonic() - started < 15, "refused only after loading something heavy"
    assert not out.exists()


def test_unsupported_architecture_is_refused_before_loading(saige_data, tiny_model, tmp_path):  # noqa: F811
    model = model_like(tiny_model, tmp_path / "gpt2", "gpt2")
    data = convert(saige_data, tmp_path / "train.csv")
    for kind in ("gguf", "ollama"):
        out = tmp_path / f"out-{kind}"
        started = time.monotonic()
        result = train(data, model, out, "--export", kind, "--ollama-base", "x:1")
        refused(result, started, out, f"--export {kind}: llama.cpp adapters are written for llama, mistral and qwen2")
        assert "gpt2" in result.stderr


@pytest.mark.parametrize(
    "args, pattern",
    [
        pytest.param(["--export", "gguf", "--export", "ollama"], "--ollama-base", id="ollama-without-a-base"),
        pytest.param(
            ["--export", "gguf", "--target-modules", "q_proj,embed_tokens"], "embed_tokens", id="embedding-lora"
        ),
        pytest.param(["--ollama-base", "x:1"], "--ollama-base", id="ollama-base-without-ollama-export"),
    ],
)
def test_export_flags_it_cannot_honour_are_refused_before_loading(saige_data, tiny_model, tmp_path, args, pattern):  # noqa: F811
    data = convert(saige_data, tmp_path / "train.csv")
    out = tmp_path / "out"
    started = time.monotonic()
    refused(train(data, tiny_model, out, *args), started, out, pattern)


def test_help_lists_the_export_flags():
    result = run(SCRIPT, "--help")
    assert result.returncode == 0
    for text in ("--export", "gguf", "ollama", "cloudflare", "--ollama-base"):
        assert text in result.stdout


@pytest.mark.slow  # SmolLM2-135M (dequantized once into the cache), a few minutes on a CPU
def test_offline_smollm2_gguf_base(saige_data, tmp_path):  # noqa: F811
    """The real offline base, a .gguf file: FROM is its absolute path, and the q/k permutation uses SmolLM2's 9
    attention heads and 3 KV heads."""
    data = convert(saige_data, tmp_path / "train.csv", "--format", "chatml")
    out = tmp_path / "adapter"
    result = run(
        SCRIPT, "--data", data, "--model", "offline", "--output-dir", out, "--batch-size", "2", "--max-length", "256",
        "--target-modules", ",".join(PROJECTIONS), "-q", *LORA, "--export", "gguf", "--export", "ollama", timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    meta, tensors = read_gguf(out / "adapter.gguf")
    assert meta["general.architecture"] == "llama" and len(tensors) == 30 * 2 * len(PROJECTIONS)
    peft = peft_tensors(out)
    key = "base_model.model.model.layers.0.self_attn"
    for proj, n_head in (("q_proj", 9), ("k_proj", 3)):
        a, b = peft[f"{key}.{proj}.lora_A.weight"], peft[f"{key}.{proj}.lora_B.weight"]
        name = f"blk.0.{LLAMA_CPP_NAMES[proj]}.weight"
        gguf_delta = tensors[f"{name}.lora_b"][0] @ tensors[f"{name}.lora_a"][0]
        np.testing.assert_allclose(gguf_delta, permute(b @ a, n_head), rtol=1e-6, atol=1e-8)
    found = modelfile(out / "ollama")
    assert found["FROM"].startswith("/") and found["FROM"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert Path(found["FROM"]).is_file()


# Ollama's published templates (ollama/ollama, template/*.gotmpl, read 2026-12-03), the branch a Modelfile renders
# for one system prompt and one user message (no .Messages); zephyr.gotmpl has only the .Messages form, written out
# here for [system, user]. Pinned, so a change on either side shows.
OLLAMA_PUBLISHED = {
    "chatml": "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}<|im_start|>user\n"
    "{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}<|im_end|>\n",
    "llama3": "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>",
    "tinyllama": "<|system|>\n{{ .System }}</s>\n<|user|>\n{{ .Prompt }}</s>\n<|assistant|>\n",
    "mistral": "[INST] {{ if .System }}{{ .System }} {{ end }}{{ .Prompt }}[/INST] {{ .Response }}</s>",
}
BOS = {"chatml": None, "llama3": "<|begin_of_text|>", "tinyllama": None, "mistral": "<s>"}  # what Ollama adds


def render_go(template: str, system: str, prompt: str) -> str:
    """The prompt (up to the answer) a simple Ollama template renders: {{ if .X }}...{{ end }} and {{ .X }}."""
    values = {"System": system, "Prompt": prompt}
    branch = re.compile(r"\{\{ if \.(\w+) \}\}(.*?)\{\{ end \}\}", re.S)
    text = branch.sub(lambda m: m[2] if values[m[1]] else "", template)
    text = text.split("{{ .Response }}")[0]
    return text.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt)


@pytest.mark.parametrize("fmt", sorted(OLLAMA_PUBLISHED))
def test_the_modelfile_prompts_as_ollamas_published_template_does(fmt):
    sys.path.insert(0, str(ROOT))
    import saige_to_sft
    import train_local

    layout = saige_to_sft.resolve_template(fmt, None, "Be kind.")
    sidecar = {"prompt_template": layout.prompt, "response_end": layout.end, "system_prompt": layout.system}
    template, system, _ = train_local.ollama_template(sidecar, BOS[fmt])
    ours = render_go(template, system or "", "Hello?")
    published = render_go(OLLAMA_PUBLISHED[fmt], "Be kind.", "Hello?")
    if fmt == "mistral":  # the training layout (Mistral's own chat template, tests/test_formats.py) wins over Ollama's
        assert ours == "[INST] Be kind.\n\nHello? [/INST]" and published == "[INST] Be kind. Hello?[/INST] "
    else:
        assert ours == published
