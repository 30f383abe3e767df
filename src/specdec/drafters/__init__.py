"""One file per method; each registers itself under its `name`."""

from __future__ import annotations

from specdec.drafters import draft_model, pld, vanilla  # noqa: F401  (registration)
from specdec.drafters.base import REGISTRY, Drafter, Request
from specdec.errors import InputError

__all__ = ["REGISTRY", "Drafter", "Request", "make_drafter", "methods"]


def methods() -> list[str]:
    return sorted(REGISTRY)


def make_drafter(method: str, draft_model=None, **options) -> Drafter:
    """Build a registered drafter; `options` go to its config (e.g. num_tokens=8)."""
    cls = REGISTRY.get(method)
    if cls is None:
        raise InputError(f"unknown method {method!r} (choose from {', '.join(methods())})")
    try:
        return cls.create(draft_model=draft_model, **options)
    except (TypeError, ValueError) as e:
        raise InputError(f"method {method!r}: {e}") from None
