"""whisper-convert: turn a Whisper model into a compiled .maxpkg (thin wrapper over convert())."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__)


@app.command()
def convert_cmd(
    model: str = typer.Argument(
        ..., help="openai-whisper name (tiny.en, base, ...), a .pt checkpoint, or a CTranslate2 model folder"
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="package to write (default: <model>.maxpkg)"),
    skip_check: bool = typer.Option(
        False, "--skip-check", help="write without the parity check (recorded in the manifest)"
    ),
    parity: str = typer.Option(
        "outputs",
        "--parity",
        help=(
            "outputs: check the runtime graphs' outputs against openai-whisper (one compile; the per-layer probe is "
            "compiled only to name the first layer that diverges when they disagree); layers: check every layer too"
        ),
    ),
    report: str = typer.Option("md", "--report", help="parity report format: md or html"),
    dtype: str = typer.Option(
        "float32",
        "--dtype",
        help=(
            "how weight matrices are stored: float32, or bfloat16 (half the bytes; every product widens them "
            "exactly and sums in float32)"
        ),
    ),
    print_ir: bool = typer.Option(False, "--print-ir", help="print the traced IR and stop"),
    rebuild: bool = typer.Option(
        False,
        "--rebuild",
        help="MODEL is a .maxpkg: recompile it for this machine from its own IR and weights (no torch)",
    ),
    force: bool = typer.Option(False, "--force", help="replace an existing package at --out"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log each stage's details"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print no stage lines (errors and the result line only)"),
    progress_file: Path | None = typer.Option(
        None,
        "--progress_file",
        help="also append each stage line (and a line every 30 s of a long stage) to this file",
    ),
) -> None:
    from .progress import Stages

    stage = Stages(quiet, progress_file)  # stderr: stdout keeps the one result line
    try:
        _convert_cmd(model, out, skip_check, parity, report, dtype, print_ir, rebuild, force, verbose, stage)
    finally:
        stage.close()


def _convert_cmd(model, out, skip_check, parity, report, dtype, print_ir, rebuild, force, verbose, stage) -> None:
    from .convert import ConvertError

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    if out is None and not rebuild:
        out = Path(Path(model).name.removesuffix(".pt") + ".maxpkg")
    in_place = rebuild and (out is None or out.resolve() == Path(model).resolve())
    if out is not None and out.exists() and not in_place and not force:  # checked before any work
        raise ConvertError(
            f"{out} exists; pass --force to replace it (it is replaced only once the new package is complete)"
        )
    if rebuild:
        from .convert import rebuild as rebuild_package

        result = rebuild_package(Path(model), out, stage=stage)
        typer.echo(f"rebuilt {result.path} for MAX {result.manifest.max_version} in {result.timings['compile']:.1f}s")
        return
    if print_ir:
        from . import ir, sources, trace

        src = sources.resolve(model)
        typer.echo(
            ir.format_program(
                trace.trace_program(
                    trace.model_from_state_dict(src.dims, src.state_dict, src.alignment_heads, src.location)
                )
            ),
            nl=False,
        )
        return
    from .convert import convert

    result = convert(model, out, skip_check=skip_check, report_format=report, dtype=dtype, stage=stage, parity=parity)
    p = result.manifest.parity
    t = result.timings
    checked = (
        f"parity ok ({p['check']}): {p['entries']} tensors, worst max_rel_err {p['worst_rel_err']:.2g}"
        if p["checked"]
        else "parity NOT checked (--skip-check)"
    )
    typer.echo(
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {checked}; "
        + ", ".join(f"{k} {v:.1f}s" for k, v in t.items())
    )


def main(argv: list[str] | None = None) -> int:
    from ..runtime.cliutil import run_app
    from ..runtime.package import PackageError
    from .convert import ConvertError
    from .ir import TraceError
    from .lower import LoweringError
    from .sources import ModelSourceError

    return run_app(
        app, argv, "whisper-convert", (ModelSourceError, ConvertError, LoweringError, TraceError, PackageError)
    )


def run() -> None:
    sys.exit(main(sys.argv[1:]))
