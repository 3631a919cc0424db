"""whisper-batch: transcribe a corpus (files, folders, lists of paths) into a folder, resumably,
on this machine's engine or on Ray actors.

Every input file maps to `<out>/<path relative to its input folder, or its name>.<format>`, without
the audio extension unless two inputs differ only by it (jfk.wav, jfk.flac). A file
whose outputs all exist is skipped (each output is written under a temporary name and renamed:
one that exists is complete), so a re-run after an interruption or a deleted output redoes only
what is missing. A file that cannot be read is recorded in `<out>/summary.json` (status,
duration, error) and the others go on; the exit code is 1 when any file failed.

With `--ray` (a local Ray instance started for the job) or `--ray_address ADDR` (an existing
cluster), files go in groups of `--batch_size` to a pool of actors, each of which loads the model
once and decodes its group on its own engine; this process writes the outputs and the summary,
so the files are the same as a local run's. An actor that dies (killed, out of memory, its node
lost) is restarted and its group decoded again, up to RAY_RETRIES times; the outputs of a group
are written when it returns, so each once. On a cluster, every node must see the input paths
(a shared filesystem) and have whisper-max installed; each node's actors make or reuse the
package for a model name in that node's cache (compiled for its CPU).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import typer

from .cliutil import ModelDir, Trust, run_app
from .extras import require
from .files import atomic_open
from .flags import transcribe_options, with_flags
from .options import fallback_temperatures

AUDIO_EXTENSIONS = frozenset(
    ".wav .flac .mp3 .m4a .ogg .oga .opus .webm .mp4 .mkv .aac .wma .aif .aiff .au .caf".split()
)
LIST_EXTENSIONS = frozenset((".txt", ".lst", ".list"))
SUMMARY = "summary.json"
RAY_RETRIES = 3  # restarts of a dead actor, and retries of the group it was decoding


class BatchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Job:
    """One input file and where its outputs go: `<out>/<rel>.<format>` for each format."""

    audio: Path
    rel: Path  # output path relative to --out, without the format's extension

    def outputs(self, out: Path, formats: list[str]) -> list[Path]:
        return [out / self.rel.parent / f"{self.rel.name}.{fmt}" for fmt in formats]


def collect(inputs: list[Path]) -> list[Job]:
    """Jobs for files, folders (recursive, audio extensions) and lists of paths (.txt/.lst/.list,
    one path per line, relative to the list's folder; `#` starts a comment), in the order given
    (a folder's files sorted). Refuses missing inputs and two files that would share outputs."""
    jobs: list[Job] = []
    for arg in inputs:
        if arg.is_dir():
            found = sorted(p for p in arg.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
            jobs += [Job(p, p.relative_to(arg).with_suffix("")) for p in found]
        elif arg.is_file() and arg.suffix.lower() in LIST_EXTENSIONS:
            for n, line in enumerate(arg.read_text(encoding="utf-8").splitlines(), 1):
                entry = line.split("#", 1)[0].strip()
                if not entry:
                    continue
                path = arg.parent / entry
                if not path.is_file():
                    raise BatchError(f"{arg}:{n}: {entry}: no such file")
                jobs.append(Job(path, Path(path.stem)))
        elif arg.is_file():
            jobs.append(Job(arg, Path(arg.stem)))
        else:
            raise BatchError(f"{arg}: no such file or folder")
    jobs = list({job.audio.resolve(): job for job in jobs}.values())  # a file given twice runs once
    stems: dict[Path, int] = {}
    for job in jobs:
        stems[job.rel] = stems.get(job.rel, 0) + 1
    # files that differ only in extension (jfk.wav, jfk.flac) keep it in their outputs' names
    jobs = [Job(j.audio, j.rel.with_name(j.audio.name)) if stems[j.rel] > 1 else j for j in jobs]
    seen: dict[Path, Path] = {}
    for job in jobs:
        other = seen.setdefault(job.rel, job.audio)
        if other != job.audio:
            raise BatchError(
                f"{other} and {job.audio} would both write {job.rel}.*; give them in folders (outputs keep the "
                "folders' structure) or rename one"
            )
    return jobs


def _write_json(path: Path, data) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")


class Summary:
    """`summary.json`: one entry per input (status done / skipped / failed, audio seconds, error),
    rewritten atomically as files finish (at most every few seconds) and at the end."""

    def __init__(self, path: Path, jobs: list[Job], header: dict):
        self.path, self.header = path, header
        previous = {}
        try:
            previous = {f["input"]: f for f in json.loads(path.read_text())["files"]}
        except (OSError, ValueError, KeyError, TypeError):
            pass
        self.entries = {
            str(j.audio): {
                "input": str(j.audio),
                "status": "pending",
                "duration": previous.get(str(j.audio), {}).get("duration"),
                "error": None,
            }
            for j in jobs
        }
        self.written = 0.0

    def set(self, job: Job, status: str, duration: float | None = None, error: str | None = None) -> None:
        entry = self.entries[str(job.audio)]
        entry.update(status=status, error=error)
        if duration is not None:
            entry["duration"] = round(duration, 3)
        if time.monotonic() - self.written > 5:
            self.write()

    def counts(self) -> dict:
        counts = {"done": 0, "skipped": 0, "failed": 0, "pending": 0}
        for e in self.entries.values():
            counts[e["status"]] += 1
        return counts

    def write(self) -> None:
        _write_json(self.path, {**self.header, **self.counts(), "files": list(self.entries.values())})
        self.written = time.monotonic()


def run_batch(
    model_arg: str,
    inputs: list[Path],
    out: Path,
    options,
    *,
    output_format: str = "all",
    batch_size: int = 8,
    model_dir: Path | None = None,
    trust: bool = False,
    ray: bool = False,
    ray_address: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Transcribe every input into `out`; returns the summary's counts. See the module doc."""
    from tqdm import tqdm

    from .writers import output_formats, write_result

    formats = output_formats(output_format)  # checked before any work
    summary, jobs, todo = _plan(model_arg, inputs, out, output_format, formats)
    bar = tqdm(
        total=len(jobs),
        initial=len(jobs) - len(todo),
        unit="file",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    record = _Recorder(out, output_format, summary, bar, write_result)
    try:
        if todo and (ray or ray_address):
            _run_on_ray(
                model_arg,
                todo,
                options,
                record,
                batch_size=batch_size,
                model_dir=model_dir,
                trust=trust,
                address=ray_address,
                workers=workers,
            )
        elif todo:
            _run_here(model_arg, todo, options, record, batch_size=batch_size, model_dir=model_dir, trust=trust)
    finally:
        bar.close()
        summary.write()
    return summary.counts()


def _plan(model_arg: str, inputs: list[Path], out: Path, output_format: str, formats) -> tuple[Summary, list, list]:
    """The summary, every job and the jobs still to do (those whose outputs are not all there)."""
    jobs = collect(inputs)
    if not jobs:
        raise BatchError(
            f"no audio files in {', '.join(map(str, inputs))} (extensions: {' '.join(sorted(AUDIO_EXTENSIONS))})"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BatchError(f"--out {out}: cannot create it ({e.strerror or e})") from e
    summary = Summary(out / SUMMARY, jobs, {"model": model_arg, "output_format": output_format})
    todo = []
    for job in jobs:
        if all(p.is_file() for p in job.outputs(out, formats)):
            summary.set(job, "skipped")
        else:
            todo.append(job)
    summary.write()
    return summary, jobs, todo


class _Recorder:
    """Called with each finished job: writes its outputs, records it in the summary, moves the bar."""

    def __init__(self, out: Path, output_format: str, summary: Summary, bar, write_result) -> None:
        self.out, self.output_format, self.summary, self.bar = out, output_format, summary, bar
        self.write_result = write_result
        self.audio_s, self.started = 0.0, time.perf_counter()

    def __call__(self, job: Job, result, duration: float | None, error: str | None) -> None:
        if error is None:
            folder = self.out / job.rel.parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
                self.write_result(result, job.audio, folder, self.output_format, stem=job.rel.name)
            except OSError as e:  # the disk: no later file could be written either
                self.summary.set(job, "failed", duration, f"cannot write outputs: {e}")
                self.summary.write()
                raise BatchError(
                    f"{e.filename}: cannot write ({e.strerror or e}); stopped; re-run the same command to go on"
                ) from e
            self.summary.set(job, "done", duration)
            self.audio_s += duration or 0.0
        else:
            self.summary.set(job, "failed", duration, error)
        elapsed = time.perf_counter() - self.started
        rate = f"{self.audio_s / 3600:.2f} h audio, RTF {elapsed / self.audio_s:.3f}" if self.audio_s else ""
        self.bar.set_postfix_str(rate, refresh=False)
        self.bar.update(1)


def _transcribe(
    model, audios: list[str], options, batch_size: int
) -> Iterator[tuple[int, dict | None, float | None, str | None]]:
    """(index, result, audio seconds, error) for each of `audios` as it is done, decoded together
    on the model's engine (an English-only model transcribes English, as whisper-run)."""
    from .audio import AudioError
    from .transcribe import transcribe_many

    options, _ = options.for_model(model.is_multilingual)
    durations: dict[int, float] = {}
    for i, result in transcribe_many(
        model, audios, batch_size=batch_size, options=options, engine=model.engine, keep_going=True, durations=durations
    ):
        if isinstance(result, AudioError):
            yield i, None, None, str(result)
        else:
            yield i, result, durations.pop(i), None


def _run_here(model_arg, todo: list[Job], options, record, *, batch_size, model_dir, trust) -> None:
    from . import load

    model = load(model_arg, trust=trust, model_dir=model_dir)
    for i, result, duration, error in _transcribe(model, [str(j.audio) for j in todo], options, batch_size):
        record(todo[i], result, duration, error)


class _Worker:
    """A Ray actor: loads the model once (making or reusing the package in its node's cache) and
    transcribes groups of files on its own engine."""

    def __init__(self, model_arg: str, model_dir: str | None, trust: bool, options, batch_size: int):
        from . import load

        self.model = load(model_arg, trust=trust, model_dir=model_dir)
        self.options, self.batch_size = options, batch_size

    def transcribe(self, first: int, audios: list[str]):
        return [
            (first + i, result, duration, error)
            for i, result, duration, error in _transcribe(self.model, audios, self.options, self.batch_size)
        ]


def _run_on_ray(model_arg, todo: list[Job], options, record, *, batch_size, model_dir, trust, address, workers) -> None:
    ray = require("ray", "ray", "whisper-batch --ray")
    from ray.util import ActorPool

    from . import models

    if address is None:  # a local Ray: make (or reuse) the package once, here, before the actors load it
        model_arg = str(models.resolve(model_arg, model_dir))
    if ray.is_initialized():
        owns = False
    else:
        owns = True
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=True, logging_level="WARNING")
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise BatchError(f"--ray_address {address}: cannot connect to a Ray cluster there ({e})") from e
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        per_actor = min(cpus, int(os.environ.get("WHISPER_MAX_RAY_CPUS_PER_WORKER", "2")))
        count = workers or max(1, cpus // per_actor)
        actor = ray.remote(num_cpus=per_actor, max_restarts=RAY_RETRIES, max_task_retries=RAY_RETRIES)(_Worker)
        pool = ActorPool(
            [
                actor.remote(model_arg, str(model_dir) if model_dir else None, trust, options, batch_size)
                for _ in range(count)
            ]
        )
        groups = [
            (first, [str(j.audio) for j in todo[first : first + batch_size]])
            for first in range(0, len(todo), batch_size)
        ]
        try:
            for rows in pool.map_unordered(lambda a, g: a.transcribe.remote(*g), groups):
                for i, result, duration, error in rows:
                    record(todo[i], result, duration, error)
        except ray.exceptions.RayError as e:  # an actor could not load the model, or died RAY_RETRIES times
            raise BatchError(
                f"a Ray worker failed ({type(e).__name__}, after {RAY_RETRIES} restarts): {e}; files finished before "
                "it are written, re-run to go on"
            ) from e
    finally:
        if owns:
            ray.shutdown()


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n\n")[0])


@app.command()
@with_flags(("language", "task", "beam_size", "word_timestamps", "vad_filter", "seed"), seed="0")
def batch_cmd(
    model: str = typer.Argument(
        ..., help="a model name (tiny.en, base, ...), a .pt checkpoint, a CTranslate2 folder, or a .maxpkg"
    ),
    inputs: list[Path] = typer.Argument(
        ..., help="audio files, folders (searched recursively) and .txt lists of paths"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the outputs and summary.json"),
    output_format: str = typer.Option("all", "--output_format", "-f", help="txt, vtt, srt, tsv, json or all"),
    batch_size: int = typer.Option(8, "--batch_size", min=1, help="files decoded together on one engine"),
    model_dir: ModelDir = None,
    trust: Trust = False,
    ray: bool = typer.Option(False, "--ray", help="run on a local Ray instance started for this job"),
    ray_address: str | None = typer.Option(
        None, "--ray_address", help="run on the Ray cluster at this address (e.g. ray://head:10001 or auto)"
    ),
    workers: int | None = typer.Option(None, "--workers", min=1, help="Ray actors (default: the cluster's CPUs / 2)"),
    flags: dict | None = None,
) -> None:
    # openai-whisper's fallback schedule, quiet, and seeded so that a file gives the same text here and on Ray
    options = transcribe_options(flags, verbose=None, temperature=fallback_temperatures(0.0, 0.2), best_of=5)
    counts = run_batch(
        model,
        inputs,
        out,
        options,
        output_format=output_format,
        batch_size=batch_size,
        model_dir=model_dir,
        trust=trust,
        ray=ray,
        ray_address=ray_address,
        workers=workers,
    )
    line = (
        f"whisper-batch: {counts['done']} transcribed, {counts['skipped']} already done, {counts['failed']} "
        f"failed; see {out / SUMMARY}"
    )
    print(line, file=sys.stderr)
    if counts["failed"] or counts["pending"]:
        raise typer.Exit(1)


def main(argv: list[str] | None = None) -> int:
    from .audio import AudioError
    from .package import PackageError

    return run_app(
        app, sys.argv[1:] if argv is None else argv, "whisper-batch", (BatchError, PackageError, AudioError, ValueError)
    )


def run() -> None:
    sys.exit(main(sys.argv[1:]))
