"""Code copied between the standalone scripts stays identical: each copy equals its file in shared_blocks/."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

EXPECTED = {  # block -> the scripts that must carry it
    "safe paths": {"saige_to_sft.py", "collect_experiences.py", "test_model.py", "train_local.py"},
    "heldout split": {"saige_to_sft.py", "collect_experiences.py", "test_model.py"},
    "heldout suite": {"saige_to_sft.py", "collect_experiences.py"},
    "d1 dump": {"saige_to_sft.py", "test_model.py"},
    "prompt encoding": {"collect_experiences.py", "test_model.py"},
    "generation speed": {"collect_experiences.py", "test_model.py"},
    "hardware bf16": {"collect_experiences.py", "test_model.py", "train_local.py"},
    "sampling": {"collect_experiences.py", "test_model.py"},
    "progress bars": {"collect_experiences.py", "test_model.py", "train_local.py"},
    "offline model": {"collect_experiences.py", "test_model.py", "train_local.py"},
    "system prompt": {"saige_to_sft.py", "collect_experiences.py", "test_model.py", "train_local.py"},
    "contract scores": {"saige_to_sft.py", "collect_experiences.py", "saige_worker.py"},
    "contract schema": {"collect_experiences.py", "saige_worker.py"},
}


def test_every_copy_of_a_shared_block_matches_its_canonical_file():
    check = subprocess.run(
        [sys.executable, str(ROOT / "shared_blocks" / "sync.py"), "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_each_block_is_where_it_is_needed():
    sys.path.insert(0, str(ROOT / "shared_blocks"))
    import sync

    found: dict[str, set[str]] = {}
    for script, name, _ in sync.copies():
        found.setdefault(name, set()).add(script.name)
    assert found == EXPECTED
