"""Human reports a package carries, rendered from templates/ with jinja2."""

from __future__ import annotations

import jinja2

from .. import templates
from ..runtime.manifest import Manifest


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates.DIR),
        undefined=jinja2.StrictUndefined,
        autoescape=jinja2.select_autoescape(["html"]),
    )


def render(manifest: Manifest, entries: list, fmt: str = "md") -> dict[str, bytes]:
    """{"parity.md" or "parity.html", "MODEL_CARD.md"}; no parity report when the check was skipped."""
    if fmt not in ("md", "html"):
        raise ValueError(f"report format {fmt!r}: use md or html")
    env = _env()
    out = {"MODEL_CARD.md": env.get_template("model_card.md.j2").render(m=manifest).encode()}
    if entries:
        reasons: dict[str, list[str]] = {}
        for e in entries:
            reasons.setdefault(e.reason, []).append(e.name)
        out[f"parity.{fmt}"] = (
            env.get_template(f"parity.{fmt}.j2")
            .render(
                m=manifest,
                entries=entries,
                ok=all(e.ok for e in entries),
                worst=max(e.max_rel_err for e in entries),
                reasons=sorted(reasons.items(), key=lambda kv: kv[1]),
            )
            .encode()
        )
    return out
