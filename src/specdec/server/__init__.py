"""An OpenAI-compatible HTTP server over SpecDecoder (`specdec serve`; needs the `server` extra).

The app is imported on first use, not with the package: `specdec.server.cli` registers the `serve` command in
every install, including the base install without FastAPI.
"""

from __future__ import annotations

__all__ = ["Limits", "create_app"]


def __getattr__(name: str):
    if name in __all__:
        from specdec.server import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
