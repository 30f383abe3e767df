"""An OpenAI-compatible HTTP server over SpecDecoder (`specdec serve`; needs the `server` extra)."""

from specdec.server.app import Limits, create_app

__all__ = ["Limits", "create_app"]
