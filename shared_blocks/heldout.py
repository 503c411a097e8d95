"""The held-out split every script agrees on without asking the worker; copied verbatim from the marker down
(`make sync`)."""

from __future__ import annotations

import hashlib

# --- shared: heldout split (the same in every script: edit shared_blocks/heldout.py, then `make sync`) ------
HELDOUT_FRACTION = 0.25  # the pipeline's default share of scenarios kept for evaluation only (HELDOUT_FRACTION)


def is_heldout(context, fraction: float) -> bool:
    """Whether a scenario is held out (evaluated, never trained on) at this fraction of all scenarios.

    Decided by a hash of the scenario's context text, whitespace folded: every script, every copy of a database
    and every D1 export agree without asking the worker, even where a copied scenario got another id. A scenario
    held out at one fraction stays held out at any larger one."""
    if fraction <= 0 or not isinstance(context, str):
        return False
    digest = hashlib.sha256(b"saige-heldout\0" + fold(context).encode("utf-8", "replace")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def fold(context) -> str:
    """A scenario's text as the split sees it: whitespace folded."""
    return " ".join(str(context).split())


# --- end shared: heldout split ----------------------------------------------------------------------------
