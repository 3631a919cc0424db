"""Write docs/cli.md, every command's flags, from the typer apps themselves.

    python scripts/cli_docs.py          # rewrite docs/cli.md
    python scripts/cli_docs.py --check  # exit 1 if docs/cli.md is not what the apps say

tests/unit/test_docs.py runs the check, so a flag added, renamed or re-described without
regenerating the page fails the suite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import click
import typer
from typer.cli import get_docs_for_click

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
# (command name, module holding its typer app `app`); the order of the page
COMMANDS = (
    ("whisper-run", "whisper_max.runtime.cli"),
    ("whisper-convert", "whisper_max.converter.cli"),
    ("whisper-serve", "whisper_max.runtime.serve"),
    ("whisper-batch", "whisper_max.runtime.batch"),
)


def render() -> str:
    import importlib

    parts = [
        "# Command-line reference\n",
        "Generated from the commands' own definitions by `python scripts/cli_docs.py`; `whisper-run` takes "
        "openai-whisper's flags with its spellings (booleans as values: `--verbose False`, `None` for no value).\n",
    ]
    for name, module in COMMANDS:
        command = typer.main.get_command(importlib.import_module(module).app)
        text = get_docs_for_click(obj=command, ctx=click.Context(command, info_name=name), name=name)
        parts.append(text.replace("# `", "## `", 1).strip() + "\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is not what the commands define: run python scripts/cli_docs.py", file=sys.stderr)
            return 1
        return 0
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(DOC)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
