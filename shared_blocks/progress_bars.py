"""When the collector, the evaluator and the trainer draw their progress bars (--quiet, --progress); copied verbatim
from the marker down (`make sync`)."""

from __future__ import annotations


# --- shared: progress bars (the same in every script: edit shared_blocks/progress_bars.py, then `make sync`) ----------
def bars_off(args) -> bool | None:
    """tqdm's `disable` for --quiet and --progress: None lets tqdm draw a bar only on a terminal, so a bar piped into a
    log (train_pipeline.sh's tee) is drawn only when asked for with --progress."""
    return True if args.quiet else False if args.progress else None


# --- end shared: progress bars ----------------------------------------------------------------------------------------
