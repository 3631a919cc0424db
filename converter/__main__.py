"""`python -m whisper_max.converter` = whisper-convert (how the runtime converts a model by name
without importing the converter)."""

from .cli import run

run()
