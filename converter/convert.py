"""whisper-convert's pipeline: resolve -> trace -> lower -> compile -> parity -> package."""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import numpy as np

from ..runtime import package, trust
from ..runtime.manifest import GraphSignature, Manifest, ModelInfo, Rebuilt, Source, Target
from ..runtime.program import LOGIT_ROWS, QUERIES, RUNTIME_GRAPHS, WINDOW, Role
from ..runtime.weights import from_bfloat16, pack_weights, to_bfloat16, with_derived
from . import ir, ir_cache, onnx_io, passes, progress, report
from .lower import compile_with_kernels, lower_graph
from .recipes import Context, Recipe, RecipeError, recipe_for
from .target import amx, bfloat16

log = logging.getLogger(__name__)


class ConvertError(RuntimeError):
    pass


@dataclass
class ConvertResult:
    path: Path
    manifest: Manifest
    parity: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)


def require_cpu_features(program: ir.Program) -> None:
    """Raise unless this CPU has the instructions the program's kernels are compiled to: the
    bfloat16 products and attention of a bfloat16 package use AMX-BF16 or AVX512_BF16."""
    if ir.uses_bfloat16_arithmetic(program) and not bfloat16(Target.host()):
        raise ConvertError(
            "this program computes products in bfloat16 (our AMX or AVX512_BF16 kernels), which need "
            f"AMX-BF16 or AVX512_BF16, and this CPU has only {list(Target.host().features)}; convert with --dtype "
            "float32 here"
        )


def _compile(program: ir.Program, session, stage, source: str, dtype: str, model: str) -> tuple[bytes, float]:
    """The program compiled and exported (MEF bytes) and the seconds it took; `stage` is told how
    long the compile takes on this machine, and a cold compile's time is recorded for next time."""
    key = progress.compile_key(package.max_version(), dtype, model)
    expect = progress.expected_compile(key)
    program = runtime_program(program)
    stage(
        f"compiling {len(program.graphs)} graphs for this CPU{source} ({progress.about(expect)}; MAX caches the "
        "result)",
        expect,
    )
    t = time.perf_counter()
    mef = export_mef(compile_module(program, session))
    elapsed = time.perf_counter() - t
    progress.record_compile(key, elapsed)
    return mef, elapsed


def runtime_program(program: ir.Program) -> ir.Program:
    """The graphs a package compiles (program.RUNTIME_GRAPHS), in the program's order; the IR it
    ships keeps the others (the general decoder and decoder_step: decoder_rows' sources, and what
    the per-layer parity probe compiles; an older package's IR also has an alignment graph)."""
    return ir.Program(tuple(g for g in program.graphs if g.name in RUNTIME_GRAPHS), program.dims)


def compile_module(program: ir.Program, session):
    """Lower and compile the program's graphs as one MAX module."""
    from max.graph import Module

    mod = Module()
    for g in program.graphs:
        lower_graph(g, mod)
    return compile_with_kernels(session, mod)


def export_mef(compiled) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.mef"
        try:
            compiled.export_mef(str(path))
        except (OSError, ValueError) as e:  # MAX reports a failed write (full disk, ulimit -f) as ValueError
            raise ConvertError(
                f"cannot export the compiled program to {path} ({e}); set TMPDIR to a folder with room, nothing was "
                "written"
            ) from e
        return path.read_bytes()


def tokenizer_assets(multilingual: bool, num_languages: int) -> dict[str, bytes]:
    """openai-whisper's vocabulary and special tokens, so the runtime needs no openai-whisper."""
    import whisper
    from whisper.tokenizer import LANGUAGES, get_encoding, get_tokenizer

    name = "multilingual" if multilingual else "gpt2"
    enc = get_encoding(name, num_languages)
    tokenizer = get_tokenizer(multilingual, num_languages=num_languages)
    ranks = (Path(whisper.__file__).parent / "assets" / f"{name}.tiktoken").read_bytes()
    meta = {
        "encoding": name,
        "num_languages": num_languages,
        "languages": [[code, LANGUAGES[code]] for code in list(LANGUAGES)[:num_languages]],
        "pat_str": enc._pat_str,
        "special_tokens": enc._special_tokens,
        "n_vocab": enc.n_vocab,
        # what the default --suppress_tokens -1 adds; stored because computing it takes the
        # first tiktoken encode of a run (~50 ms of start-up)
        "non_speech_tokens": list(tokenizer.non_speech_tokens),
    }
    return {f"assets/{name}.tiktoken": ranks, "assets/tokenizer.json": json.dumps(meta, indent=1).encode()}


def mel_assets(n_mels: int) -> dict[str, bytes]:
    import whisper

    with np.load(Path(whisper.__file__).parent / "assets" / "mel_filters.npz", allow_pickle=False) as f:
        filters = f[f"mel_{n_mels}"].astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, filters, allow_pickle=False)
    return {"assets/mel_filters.npy": buf.getvalue()}


def stored_as(w: np.ndarray, dtype: str):
    """A float32 checkpoint tensor as the package stores it (passes.store_weights chose dtype)."""
    if dtype == "bfloat16":
        return to_bfloat16(w)
    if dtype == "float16":
        out = np.asarray(w).astype(np.float16)
        if not np.array_equal(out.astype(np.float32), w):
            raise ConvertError("a weight chosen for float16 storage is not exactly a float16; no package written")
        return out
    return w


PARITY_CHECKS = ("outputs", "layers")


def convert(
    model_arg: str,
    out: Path,
    skip_check: bool = False,
    report_format: str = "md",
    dtype: str = "float32",
    stage=None,
    parity: str = "outputs",
) -> ConvertResult:
    """Convert a model into a package at `out`. `dtype` bfloat16 stores the weight matrices in
    bfloat16 (half the bytes; passes.store_weights); parity uses that dtype's tolerances.
    `parity` "outputs" checks what the runtime's graphs compute, from the one compile, and
    compiles the per-layer probe only to name the first layer that diverges when that fails;
    "layers" checks every layer too. `stage(str, expect=None)` is told as each stage starts, with
    the seconds a long one is expected to take (whisper-convert prints it with the time)."""
    if parity not in PARITY_CHECKS:
        raise ConvertError(f"--parity {parity!r}: use {' or '.join(PARITY_CHECKS)}")
    from max.engine import InferenceSession

    from . import sources, trace

    target = Target.host()
    try:
        recipe = recipe_for("whisper", dtype, target)
    except RecipeError as e:
        raise ConvertError(f"--dtype {dtype}: {e}") from None
    stage = stage or _quiet
    timings: dict[str, float] = {}
    stage(f"reading the weights of {model_arg}")
    t = time.perf_counter()
    src = sources.resolve(model_arg)
    model = trace.model_from_state_dict(src.dims, src.state_dict, src.alignment_heads, src.location)
    timings["resolve"] = time.perf_counter() - t

    t = time.perf_counter()
    program = _optimised(model, src, recipe, target, stage)
    timings["trace"] = time.perf_counter() - t
    stored = program.stored_weights()
    unused = sorted(set(src.state_dict) - set(stored))
    if unused:
        raise ConvertError(f"traced program does not use checkpoint tensors {unused[:5]}: the trace is incomplete")
    # what weights.bin holds; the graphs also bind the widened weights made from it at load
    weights = {name: stored_as(src.state_dict[name], dt) for name, dt in stored.items()}
    bound = with_derived(weights, program.weight_names())
    if dtype != "float32":
        # the oracle for parity is openai-whisper (fp32) on the weights the package holds: the
        # program must compute what it computes (the bfloat16 step within its own tolerance);
        # what rounding the weights costs is measured on transcripts (scripts/wer.py)
        widened = {
            k: from_bfloat16(weights[k]) if stored.get(k) == "bfloat16" else w for k, w in src.state_dict.items()
        }
        model = trace.model_from_state_dict(src.dims, widened, src.alignment_heads, src.location)

    session = InferenceSession()
    mef, timings["compile"] = _compile(program, session, stage, "", recipe.precision, src.name)
    entries: list = []
    parity_info: dict = {"checked": False}
    if not skip_check:
        entries, parity_info = _check_parity(program, session, mef, bound, model, recipe, stage, timings, parity)

    stage(f"writing {out}")
    manifest = _manifest(src, program, recipe, target, parity_info, skip_check, timings)
    files: dict[str, bytes] = {"model.mef": mef, "ir.txt": ir.format_program(program).encode()}
    files.update(onnx_io.to_onnx_files(program))
    files["weights.json"], files["weights.bin"] = pack_weights(weights)
    files.update(tokenizer_assets(src.multilingual, model.num_languages))
    files.update(mel_assets(src.dims["n_mels"]))
    files["parity.json"] = json.dumps([e.as_json() for e in entries], indent=1).encode()
    files.update(report.render(manifest, entries, report_format))
    written = package.write_package(out, manifest, files)
    trust.record(written.files["model.mef"].sha256, out)  # this machine compiled it
    log.info("wrote %s (%.1f MB)", out, Path(out).stat().st_size / 1e6)
    return ConvertResult(Path(out), written, entries, timings)


def _optimised(model, src, recipe: Recipe, target: Target, stage) -> ir.Program:
    """The checkpoint's program after the recipe's passes: from the IR cache when this
    architecture, recipe and target were traced before by this build (ir_cache), else traced
    with torch.export, optimised, and cached."""
    from . import trace

    ctx = Context(target, src.state_dict)
    name = ir_cache.key(src.dims, src.state_dict, recipe, target, ctx.exact if recipe.reads_exact else None)
    program = ir_cache.load(name)
    if program is not None:
        stage(f"reading the optimised IR from the cache ({ir_cache.directory() / name}.zip)")
        return program
    stage("tracing with torch.export, optimising the IR")
    program = recipe.apply(trace.trace_program(model), ctx)
    ir_cache.store(name, program)
    return program


def _check_parity(
    program: ir.Program, session, mef: bytes, bound: dict, model, recipe: Recipe, stage, timings: dict, check: str
):
    """The compiled program (the exported MEF, as the runtime loads it) against openai-whisper on
    the bundled clip: every graph output and decoding route, and with `check` "layers", or when
    an output is out of tolerance, every layer through the probe graphs (a second compile).
    Returns (entries, the manifest's parity record); raises ConvertError naming each tensor out
    of tolerance and the first layer that diverges; nothing is written then."""
    from max import engine

    from ..golden import capture as gc
    from . import parity

    models = session.init_all(engine.read(io.BytesIO(mef)), weights_registry=bound)
    stage("parity: the runtime graphs' outputs against openai-whisper (PyTorch fp32) on jfk.wav")
    t = time.perf_counter()
    audio = gc.load_clip()
    mel = gc.mel_for(model, audio)
    tokens, text = gc.decode_tokens(model, mel)
    ref = gc.capture(model, mel, tokens)
    mel_np = np.ascontiguousarray(mel.numpy())
    cross = parity.cross_kv(program, models, ref)
    entries = parity.end_to_end(program, models, ref, mel_np, tokens, cross, recipe.tolerances)
    timings["parity"] = time.perf_counter() - t
    outputs_failed = any(not e.ok for e in entries)
    layers: list = []
    if check == "layers" or outputs_failed:
        why = "to find the first layer that diverges" if outputs_failed else "every layer's output"
        stage(f"compiling the parity probe ({why})")
        t = time.perf_counter()
        probe_compiled, taps = compile_module_probe(program, session)
        probe = session.init_all(probe_compiled, weights_registry=bound)
        timings["compile_probe"] = time.perf_counter() - t
        t = time.perf_counter()
        layers = parity.layer_outputs(program, probe, taps, ref, mel_np, tokens, cross, recipe.tolerances)
        timings["parity_layers"] = time.perf_counter() - t
    entries = layers + entries
    failed = [e for e in entries if not e.ok]
    if failed:
        raise ConvertError(_parity_failure(entries, failed, layers))
    return entries, {
        "checked": True,
        "check": "layers" if layers else "outputs",
        "clip": gc.JFK_WAV.name,
        "dtype": recipe.precision,
        "tokens": len(tokens),
        "reference_text": text.strip(),
        "entries": len(entries),
        "all_ok": True,
        "worst_rel_err": max(e.max_rel_err for e in entries),
    }


def _parity_failure(entries: list, failed: list, layers: list) -> str:
    lines = "\n".join(
        f"  {e.name}: max_abs_err {e.max_abs_err:.3g}, max_rel_err {e.max_rel_err:.3g} > tol {e.tol:g}" for e in failed
    )
    first = next((e.name for e in layers if not e.ok), None)
    where = (
        f"the first layer that diverges: {first}"
        if first
        else "every layer is within tolerance (the difference is in what follows the layers)"
    )
    return (
        f"parity failed for {len(failed)} of {len(entries)} tensors; no package written; {where}:\n{lines}\n"
        "Bisect with WHISPER_MAX_STOP_AFTER=<IR node> (see `whisper-convert --print-ir`); "
        "--skip-check writes the package anyway and records that in the manifest"
    )


def _manifest(
    src, program: ir.Program, recipe: Recipe, target: Target, parity_info: dict, skip_check: bool, timings: dict
) -> Manifest:
    """The new package's manifest (its `files` are filled in as it is written); the converter's
    record names the recipe, its passes and the kind of kernels it compiled to."""
    import torch
    import whisper

    return Manifest(
        model=ModelInfo(
            src.name, dict(src.dims), src.multilingual, tuple((int(a), int(b)) for a, b in src.alignment_heads)
        ),
        source=Source(src.kind, src.location, src.sha256),
        max_version=package.max_version(),
        target=target,
        dtype=recipe.precision,
        graphs=_signatures(program),
        parity=parity_info,
        skip_check=skip_check,
        converter={
            "whisper_max": version("whisper-max"),
            "torch": torch.__version__,
            "openai_whisper": whisper.__version__,
            "recipe": {
                "family": recipe.family,
                "precision": recipe.precision,
                "passes": recipe.pass_names,
                "kernels": recipe.kernels(target),
            },
        },
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        timings_s={k: round(v, 2) for k, v in timings.items()},
    )


def _quiet(message: str, expect: float | None = None) -> None:
    pass


def compile_module_probe(program: ir.Program, session):
    """The probe graphs alone: same lowering, module outputs as extra outputs."""
    from max.graph import Module

    from . import parity

    mod = Module()
    taps = parity.build_probe(program, mod)
    return compile_with_kernels(session, mod), taps


def rebuild(pkg_path: Path, out: Path | None = None, stage=None) -> ConvertResult:
    """Recompile a package for this machine from its own IR and weights; no torch, no source model.

    Everything but the MEF and the target fields is kept. parity.json still describes the
    original build: the program and weights are the same, only the kernels were compiled again.
    """
    from max.engine import InferenceSession

    pkg = package.Package.open(pkg_path)
    program = onnx_io.from_onnx_files({n: pkg.read(n) for n in pkg.names() if n.startswith("ir/")})
    if set(pkg.manifest.graphs) - {g.name for g in program.graphs}:
        raise ConvertError(f"{pkg_path}: IR graphs {[g.name for g in program.graphs]} lack some of the manifest's")
    weights = pkg.weights()
    pkg.check_weights(weights)
    # what later converters add that needs no source model (a package made before them gets it)
    if any(g.name == Role.DECODER_ROWS and WINDOW not in {v.name for v in g.inputs} for g in program.graphs):
        program = passes.engine_rows(program)
    program = passes.token_selection(program)
    if LOGIT_ROWS not in {v.name for v in program.graph(Role.DECODER_ROWS).inputs}:
        program = passes.logit_rows(program)
    if not any(name.endswith(QUERIES) for name, _ in program.graph(Role.DECODER_ROWS).outputs):
        program = passes.cross_queries(program)
    program = passes.panel_products(program, bfloat16=not amx(Target.host()))
    require_cpu_features(program)
    old = pkg.manifest
    session, stage = InferenceSession(), stage or _quiet
    mef, elapsed = _compile(program, session, stage, " from the package's IR", old.dtype, old.model.name)
    files = {n: pkg.read(n) for n in pkg.names()}
    files["model.mef"] = mef
    files["ir.txt"] = ir.format_program(program).encode()
    files.update(onnx_io.to_onnx_files(program))
    manifest = replace(
        old,
        graphs=_signatures(program),
        max_version=package.max_version(),
        target=Target.host(),
        rebuilt=Rebuilt(
            from_max_version=old.max_version,
            from_target=old.target,
            at_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            note="recompiled from the package's IR and weights; parity.json describes the original build",
        ),
    )
    out = Path(out or pkg_path)
    written = package.write_package(out, manifest, files)
    trust.record(written.files["model.mef"].sha256, out)  # this machine compiled it
    return ConvertResult(out, written, [], {"compile": elapsed})


def _signatures(program: ir.Program) -> dict[str, GraphSignature]:
    """Each graph's signature as the manifest records it (ir.graph_signature)."""
    return {g.name: ir.graph_signature(g) for g in runtime_program(program).graphs}
