"""How a prompt becomes token ids for generation, the same in the collector and the evaluator; copied verbatim from
the marker down (`make sync`)."""

from __future__ import annotations


# --- shared: prompt encoding (the same in every script: edit shared_blocks/prompt_encoding.py, then `make sync`) -
def encode_prompts(tokenizer, texts: list[str], from_sidecar: bool):
    """Padded token ids of rendered prompts, with the beginning-of-sequence token exactly as in training. A chat
    template writes BOS into the text itself; the converter's sidecar template does not, and the trainer's tokenizer
    adds it, so it is added here too, never twice."""
    bos = tokenizer.bos_token
    add = from_sidecar and not (bos and texts and texts[0].startswith(bos))
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add)


# --- end shared: prompt encoding ---------------------------------------------------------------------------
