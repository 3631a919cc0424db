"""The docs say what the code does: the command-line reference is the commands' own, and the
README's test command is the one CI runs."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _cli_docs():
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "scripts" / "cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_generated_from_the_commands():
    cli_docs = _cli_docs()
    text = cli_docs.render()
    assert (ROOT / "docs" / "cli.md").read_text() == text, "docs/cli.md is stale: run python scripts/cli_docs.py"
    for flag in ("--beam_size", "--vad_filter", "--max_upload_mb", "--ray_address", "--dtype"):
        assert f"`{flag}" in text or f", {flag}" in text, flag


def test_readme_test_command_is_what_ci_runs():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("pip install")]
    readme = re.findall(r"^pip install torch.*python -m pytest$", (ROOT / "README.md").read_text(), re.M)
    assert len(ci) == 1 and readme == ci
