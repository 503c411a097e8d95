"""One set of conventions across the scripts: the same flag means the same thing, and the exit codes a script
(the pipeline, a user's cron job) branches on are the documented ones. Each run as a user runs it."""

from __future__ import annotations

import importlib
import json
import re
import sys

import pytest
from conftest import ROOT, run

ECHO = ("--backend", "echo", "--episodes", "2", "--concurrency", "1", "--retries", "2", "--timeout", "1")


def test_collector_json_alone_prints_the_summary_and_json_file_writes_it(worker_url, tmp_path):
    printed = run("collect_experiences.py", "--worker-url", worker_url, *ECHO, "--json", "-q")
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout)["scored"] == 2

    out = tmp_path / "summary.json"
    written = run("collect_experiences.py", "--worker-url", worker_url, *ECHO, "--json", str(out), "-q")
    assert written.returncode == 0, written.stderr
    assert written.stdout == ""
    assert json.loads(out.read_text())["scored"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left beside it


def test_evaluator_json_alone_prints_only_json_on_stdout(tiny_model, worker_url):
    result = run(
        "test_model.py", "--model", str(tiny_model), "--worker-url", worker_url, "--limit", "2",
        "--max-new-tokens", "4", "-q", "--json", timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # the whole of stdout is one JSON document
    assert len(data["results"][str(tiny_model)]) == 2
    assert "weighted score (0-10)" in result.stderr  # the tables moved to stderr


def test_json_file_that_is_an_input_is_refused_in_both_scripts(tiny_model, worker_url, tmp_path):
    db = tmp_path / "saige.db"
    collector = run("collect_experiences.py", "--worker-url", worker_url, *ECHO, "--db", str(db), "--json", str(db))
    assert collector.returncode == 2 and "--json" in collector.stderr and not db.exists()
    suite = tmp_path / "suite.json"
    suite.write_text("[]")
    evaluator = run("test_model.py", "--model", str(tiny_model), "--suite", str(suite), "--json", str(suite))
    assert evaluator.returncode == 2 and "--json" in evaluator.stderr and suite.read_text() == "[]"


# --- the README's conventions tables, checked against every script ------------------------------------------
SCRIPTS = ["saige_to_sft.py", "saige_worker.py", "collect_experiences.py", "train_local.py", "test_model.py"]


def readme_table(first_header: str) -> list[list[str]]:
    """The README table whose header row starts with `first_header`: its rows as lists of cells."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return [header, *rows]


def parser_of(script: str):
    module = importlib.import_module(script.removesuffix(".py"))
    return module.build_parser()


def help_exit_codes(script: str) -> set[int]:
    """The codes the script's --help lists under 'Exit codes:'."""
    text = run(script, "--help").stdout
    paragraph = text[text.index("Exit codes:") :].split("\n\n")[0]
    return {int(code) for code in re.findall(r"(?:^Exit codes:|;)\s+(\d+)\b", " ".join(paragraph.split()))}


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_scripts_help_lists_the_exit_codes_the_readme_gives_it(script):
    _, *rows = readme_table("exit code")
    readme = {int(code) for code, _, scripts in rows if scripts == "all" or script in scripts.split(", ")}
    assert help_exit_codes(script) == readme


def test_shared_flags_have_the_readme_defaults():
    sys.path.insert(0, str(ROOT))
    header, *rows = readme_table("flag | collect_experiences.py")
    scripts = header[1:-1]
    for flag, *cells, reason in rows:
        flag = flag.strip("`")
        defaults = dict(zip(scripts, cells))
        for script, cell in defaults.items():
            actions = {s: a for a in parser_of(script)._actions for s in a.option_strings}
            if cell == "-":
                assert flag not in actions, f"{script} has {flag}, the README says it has not"
                continue
            action = actions[flag]
            if cell == "`$SAIGE_WORKER_TOKEN`":
                assert "$SAIGE_WORKER_TOKEN" in action.help, (script, flag)
            elif cell == "`[FILE]`":
                assert action.nargs == "?" and action.const == "-", (script, flag)
            elif cell.startswith("`"):
                assert str(action.default) == cell.strip("`"), (script, flag, action.default)
        differing = {c for c in cells if c != "-"}
        assert len(differing) <= 1 or reason, f"{flag}: defaults differ without a reason in the README"


def test_worker_unreachable_exits_3_in_every_script_that_calls_one(tiny_model, tmp_path):
    dead = "http://127.0.0.1:9"
    grpo = ("--model", str(tiny_model), "--output-dir", str(tmp_path / "o"), "--method", "grpo")
    runs = {
        "collect_experiences.py": run("collect_experiences.py", "--worker-url", dead, *ECHO),
        "test_model.py": run("test_model.py", "--model", str(tiny_model), "--worker-url", dead),
        "train_local.py": run("train_local.py", *grpo, "--worker-url", dead),
    }
    for script, result in runs.items():
        assert result.returncode == 3, (script, result.stderr)
        assert "Traceback" not in result.stderr, script
