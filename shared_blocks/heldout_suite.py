"""Reading an evaluation suite's scenarios to hold them out of training; copied verbatim from the marker down
(`make sync`). Needs the heldout split block's fold()."""

from __future__ import annotations

import json

from heldout import fold


# --- shared: heldout suite (the same in every script: edit shared_blocks/heldout_suite.py, then `make sync`) ----
def suite_contexts(path) -> set[str]:
    """The folded contexts of a JSON array or JSONL file of scenarios (the evaluator's --suite), to hold out too.
    Raises ValueError with one line when the file is not that."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        rows = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"cannot read the scenarios of {path} ({str(e).splitlines()[0][:80]})") from None
    found = {fold(r["context"]) for r in rows if isinstance(r, dict) and isinstance(r.get("context"), str)}
    if not found:
        raise ValueError(f"{path} holds no scenario with a context")
    return found


# --- end shared: heldout suite -----------------------------------------------------------------------------
