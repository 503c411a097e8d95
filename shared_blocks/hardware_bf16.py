"""Whether a device computes bf16 in hardware, which decides `--precision auto` in the trainer, the collector and the
evaluator; copied verbatim from the marker down (`make sync`)."""

from __future__ import annotations


# --- shared: hardware bf16 (the same in every script: edit shared_blocks/hardware_bf16.py, then `make sync`) ----------
def hardware_bf16(torch, device: str) -> bool:
    """Whether `device` computes bf16 in hardware; elsewhere bf16 is emulated, slower than fp32."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    flags = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return device == "cpu" and any(getattr(cpu, name, lambda: False)() for name in flags)


# --- end shared: hardware bf16 ----------------------------------------------------------------------------------------
