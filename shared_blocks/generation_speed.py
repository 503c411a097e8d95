"""How the collector and the evaluator pick the generation dtype and order prompts into batches; copied verbatim
from the marker down (`make sync`)."""

from __future__ import annotations

# --- shared: generation speed (the same in every script: edit shared_blocks/generation_speed.py, then `make sync`) -
GENERATION_PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # train_local.py's --precision names


def generation_precision(precision: str, device: str, fast_bf16: bool) -> str | None:
    """'bf16'|'fp16'|'fp32' to generate in: auto is bf16 where the device computes it in hardware (`fast_bf16`: a GPU
    that supports it, or a CPU with AVX-512 BF16 or AMX: 1.45x the tokens/s of fp32 at batch 32 on such a CPU, with
    the same likelihood of reference answers, README), else fp32. None: fp16 asked for on a CPU (no fast fp16
    kernels there)."""
    if precision != "auto":
        return None if precision == "fp16" and device == "cpu" else precision
    return "bf16" if fast_bf16 else "fp32"


CPU_BATCH_SIZE, OTHER_BATCH_SIZE = 32, 8


def generation_batch_size(batch_size: int | None, device: str) -> int:
    """--batch-size, else 32 on a CPU and 8 elsewhere (as before). A CPU's decoding step is bound by reading the
    weights, once per step whatever the batch, so 32 answers per read gave 1.7-2.5x the tokens/s of 8 (README)."""
    return batch_size or (CPU_BATCH_SIZE if device == "cpu" else OTHER_BATCH_SIZE)


def length_sorted(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches of indices, prompts of like token length together (least padding, so least wasted compute); the
    caller puts each answer back at its index, so the output order is the input order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


# --- end shared: generation speed --------------------------------------------------------------------------
