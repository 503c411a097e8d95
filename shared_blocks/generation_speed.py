"""How the collector and the evaluator pick the generation dtype and order prompts into batches; copied verbatim
from the marker down (`make sync`)."""

from __future__ import annotations

from pathlib import Path

# --- shared: generation speed (the same in every script: edit shared_blocks/generation_speed.py, then `make sync`) -
GENERATION_PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # train_local.py's --precision names


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or AVX-512 BF16: Intel Sapphire Rapids and later, AMD Zen 4);
    elsewhere bf16 on the CPU is emulated and slower than fp32. Linux only: False where /proc/cpuinfo is missing."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def generation_precision(precision: str, device: str, gpu_bf16: bool) -> str | None:
    """'bf16'|'fp16'|'fp32' to generate in: auto is bf16 on a GPU that supports it, bf16 on a CPU with native bf16
    (measured faster there with the same answer quality: README), fp32 elsewhere. None: fp16 asked for on a CPU
    (no fast fp16 kernels there)."""
    if precision != "auto":
        return None if precision == "fp16" and device == "cpu" else precision
    if device == "cuda":
        return "bf16" if gpu_bf16 else "fp32"
    if device == "cpu" and cpu_has_bf16():
        return "bf16"
    return "fp32"


def length_sorted(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches of indices, prompts of like token length together (least padding, so least wasted compute); the
    caller puts each answer back at its index, so the output order is the input order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


# --- end shared: generation speed --------------------------------------------------------------------------
