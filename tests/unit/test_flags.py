"""The CLIs' transcription flags, generated from TranscribeOptions: openai-whisper's names,
spelling and command-line defaults, one parser per type, errors naming the flag."""

import argparse
import importlib

import pytest
import typer
from typer.testing import CliRunner

from whisper_max.runtime.flags import FLAGS, HELP, transcribe_options, with_flags
from whisper_max.runtime.options import TranscribeOptions, fallback_temperatures
from whisper_max.runtime.vad import VadOptions

# openai-whisper's flags that are not transcription options (ours are in whisper-run's own table)
NOT_OPTIONS = {
    "audio", "model", "model_dir", "device", "output_dir", "output_format", "threads",
    "highlight_words", "max_line_width", "max_line_count", "max_words_per_line",
}  # fmt: skip


class _Parsed(Exception):
    pass


@pytest.fixture(scope="module")
def openai_whisper_cli() -> dict[str, argparse.Action]:
    """openai-whisper's own argparse actions, taken from its cli() before it parses anything."""
    got = {}

    def grab(self, *args, **kwargs):
        got.update({a.dest: a for a in self._actions})
        raise _Parsed

    real = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(_Parsed):
            importlib.import_module("whisper.transcribe").cli()  # `whisper.transcribe` is the function
    finally:
        argparse.ArgumentParser.parse_args = real
    return got


def test_every_openai_whisper_option_is_a_flag_with_its_default(openai_whisper_cli):
    theirs = {name: a for name, a in openai_whisper_cli.items() if name not in NOT_OPTIONS | {"help"}}
    assert set(theirs) <= set(FLAGS), sorted(set(theirs) - set(FLAGS))
    for name, action in theirs.items():
        default = action.default
        if isinstance(default, str) and action.type is not None:
            default = action.type(default)
        ours = FLAGS[name].parse(FLAGS[name].default)
        assert ours == default or (name == "clip_timestamps" and ours == "0"), (name, ours, default)


def test_every_flag_is_an_option_and_parses_its_spelling():
    names = {f for f in TranscribeOptions.__dataclass_fields__} | set(TranscribeOptions().decode.__dataclass_fields__)
    assert set(HELP) - {"temperature_increment_on_fallback"} <= names
    assert FLAGS["beam_size"].parse("None") is None and FLAGS["beam_size"].parse("3") == 3
    assert FLAGS["word_timestamps"].parse("yes") is True and FLAGS["verbose"].parse("none") is None
    assert FLAGS["language"].parse("None") is None and FLAGS["language"].parse("de") == "de"
    assert FLAGS["vad_parameters"].parse('{"threshold": 0.3}') == VadOptions(threshold=0.3)
    assert FLAGS["without_timestamps"].parse(None) is None


def test_flags_make_openai_whispers_command_line_options():
    flags = {name: flag.parse(flag.default) for name, flag in FLAGS.items()}
    options = transcribe_options(flags)
    assert options.temperature == fallback_temperatures(0.0, 0.2)
    assert options.verbose is True and options.decode.beam_size == 5 and options.decode.best_of == 5
    assert transcribe_options({"temperature": 0.4, "temperature_increment_on_fallback": None}).temperature == (0.4,)
    assert transcribe_options({"beam_size": 2}, best_of=3).decode.best_of == 3


def test_a_command_gets_its_flags_parsed_and_errors_name_the_flag():
    app = typer.Typer()
    seen = {}

    @app.command()
    @with_flags(("beam_size", "word_timestamps", "seed"), seed="0")
    def cmd(name: str = typer.Argument(...), flags: dict | None = None) -> None:
        seen.update(flags, name=name)

    runner = CliRunner()
    assert runner.invoke(app, ["x", "--word_timestamps", "True"]).exit_code == 0
    assert seen == {"name": "x", "beam_size": 5, "word_timestamps": True, "seed": 0}
    bad = runner.invoke(app, ["x", "--beam_size", "many"])
    assert bad.exit_code == 2 and "--beam_size" in bad.output and "'many'" in bad.output
    bad = runner.invoke(app, ["x", "--word_timestamps", "maybe"])
    assert bad.exit_code == 2 and "--word_timestamps" in bad.output and "expected True or False" in bad.output
