"""What both CLIs share: run a typer app as `main(argv) -> exit code` with plain error lines."""

from __future__ import annotations

import sys

import typer


def run_app(app: typer.Typer, argv: list[str] | None, prog_name: str, expected: tuple[type[BaseException], ...]) -> int:
    """0 on success, 1 for an expected error (one line on stderr), 2 for a usage error."""
    try:
        app(args=argv, prog_name=prog_name, standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        return 130
    except typer.TyperException as e:  # usage errors (typer's vendored click)
        e.show()
        return 2
    except expected as e:
        print(f"{prog_name}: error: {e}", file=sys.stderr)
        return 1
    return 0
