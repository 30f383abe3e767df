"""One file per method; each registers itself under its `name` (a new file here is picked up on import)."""

from __future__ import annotations

import importlib
import pkgutil

from specdec.drafters.base import REGISTRY, Drafter, Request
from specdec.errors import InputError

for _module in pkgutil.iter_modules(__path__):  # each module registers its drafter on import
    importlib.import_module(f"{__name__}.{_module.name}")

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
