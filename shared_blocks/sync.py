"""Rewrite every script's copy of each shared block from the file in this folder (`make sync`).

    python shared_blocks/sync.py           # rewrite the copies
    python shared_blocks/sync.py --check   # exit 1 and name each copy that differs

A block starts at a line `# --- shared: NAME ...` and ends at the line `# --- end shared: NAME ...`; a script that
has no such block is left alone (it does not need that helper).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
START = re.compile(r"^# --- shared: ([\w ]+?)(?: \(|\s*-*$)", re.M)


def blocks() -> dict[str, str]:
    """NAME -> canonical text of each block file here."""
    found = {}
    for path in sorted(HERE.glob("*.py")):
        if path.name == "sync.py":
            continue
        text = path.read_text(encoding="utf-8")
        match = START.search(text)
        if match:  # what comes before the marker (the imports the block needs) is not copied
            found[match.group(1)] = text[match.start() :].strip("\n") + "\n"
    return found


def span(text: str, name: str) -> tuple[int, int] | None:
    """(start, end) of the block NAME in a script's text, end included with its newline; None when absent."""
    start = re.search(rf"^# --- shared: {re.escape(name)}\b.*$", text, re.M)
    if not start:
        return None
    end = re.compile(rf"^# --- end shared: {re.escape(name)}\b.*\n?", re.M).search(text, start.end())
    if not end:
        raise SystemExit(f"sync.py: block '{name}' has no end marker")
    return start.start(), end.end()


def copies() -> list[tuple[Path, str, str]]:
    """(script, block name, the script's copy) for every block present in a top-level script."""
    found = []
    for script in sorted(ROOT.glob("*.py")):
        text = script.read_text(encoding="utf-8")
        for name in blocks():
            where = span(text, name)
            if where:
                found.append((script, name, text[where[0] : where[1]]))
    return found


def sync(check: bool) -> int:
    canonical = blocks()
    drifted = [(script, name) for script, name, copy in copies() if copy != canonical[name]]
    for script, name in drifted:
        if check:
            print(f"{script.name}: shared block '{name}' differs from shared_blocks/ (run `make sync`)")
            continue
        text = script.read_text(encoding="utf-8")
        start, end = span(text, name)
        script.write_text(text[:start] + canonical[name] + text[end:], encoding="utf-8")
        print(f"{script.name}: rewrote '{name}'")
    return 1 if check and drifted else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report differing copies, change nothing")
    sys.exit(sync(parser.parse_args().check))
