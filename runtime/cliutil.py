"""What the CLIs share: run a typer app as `main(argv) -> exit code` with plain error lines, and
parse openai-whisper's spelling of flag values (booleans as values, "None" for no value)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .extras import MissingExtra

# Options every command that loads a model takes, declared once: `model_dir: ModelDir = None`,
# `trust: Trust = False`.
ModelDir = Annotated[
    Path | None,
    typer.Option(
        "--model_dir",
        help="where packages made from model names are kept (default: $XDG_CACHE_HOME/whisper-max/models)",
    ),
]
Trust = Annotated[
    bool,
    typer.Option("--trust", help="run a package compiled elsewhere (its model.mef is machine code), and remember it"),
]


def flag_bool(value: str) -> bool:
    """A boolean flag's value as openai-whisper spells it (`--verbose False`): True/False, 1/0,
    yes/no, any case."""
    table = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
    if value.lower() not in table:
        raise typer.BadParameter(f"expected True or False, got {value!r}")
    return table[value.lower()]


def flag_optional(value: str | None, kind):
    """None for a missing value or "None" (any case), else kind(value)."""
    return None if value is None or value.lower() == "none" else kind(value)


def run_app(app: typer.Typer, argv: list[str] | None, prog_name: str, expected: tuple[type[BaseException], ...]) -> int:
    """0 on success, 1 for an expected error (one line on stderr), 2 for a usage error."""
    try:
        rc = app(args=argv, prog_name=prog_name, standalone_mode=False)  # typer.Exit(n) returns n here
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print(f"{prog_name}: interrupted", file=sys.stderr)
        return 130
    except typer.TyperException as e:  # usage errors (typer's vendored click)
        e.show()
        return 2
    except (*expected, MissingExtra) as e:
        print(f"{prog_name}: error: {e}", file=sys.stderr)
        return 1
    if rc == 130:  # typer turns Ctrl-C into Exit(130); outputs are written whole or not at all
        print(f"{prog_name}: interrupted", file=sys.stderr)
    return rc if isinstance(rc, int) else 0
