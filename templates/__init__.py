"""jinja2 templates for the reports a package carries (parity report, model card)."""

from pathlib import Path

DIR = Path(__file__).parent
