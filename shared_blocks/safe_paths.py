"""Helpers every script that writes files needs; copied verbatim from the marker down (`make sync`)."""

from __future__ import annotations

import os


# --- shared: safe paths (the same in every script: edit shared_blocks/safe_paths.py, then `make sync`) -------
def same_file(a, b) -> bool:
    """Whether two paths name one file: the same inode (hard links and symlinks included) or, for a path that does
    not exist yet, the same resolved path. None and '-' (stdin/stdout) name no file."""
    if not a or not b or str(a) == "-" or str(b) == "-":
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def path_clash(outputs: dict, inputs: dict) -> str | None:
    """A sentence naming the first output that is an input or another output, else None. Both map a flag (such as
    '--output') to a path; checked before any work, so no run can ever overwrite what it reads."""
    named = [(flag, path) for flag, path in outputs.items() if path and str(path) != "-"]
    for i, (flag, path) in enumerate(named):
        for source_flag, source in inputs.items():
            if same_file(path, source):
                return f"{flag} {path} is the same file as {source_flag} {source}; choose another {flag}"
        for other_flag, other in named[:i]:
            if same_file(path, other):
                return f"{flag} {path} and {other_flag} {other} are the same file; give each its own path"
    return None


def unwritable(path) -> str | None:
    """Why a file cannot be written at `path` (a folder, a missing or read-only folder), else None. Tried by creating
    and removing a probe file beside it: root's os.access says yes even on a read-only mount."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return f"{path} is a folder, not a file"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"folder {os.path.dirname(path) or folder} does not exist"
    probe = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.probe")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as e:
        return f"cannot write in folder {folder} ({e.strerror})"
    return None


# --- end shared: safe paths ---------------------------------------------------------------------------------
