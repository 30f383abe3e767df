"""Parallel-decoding policies for block-diffusion LMs, one file each, behind `Policy` (base.py)."""

from __future__ import annotations

from specdec.dllm.policies.adablock import AdaBlock
from specdec.dllm.policies.base import BlockView, Policy, Selection
from specdec.dllm.policies.credit import Credit
from specdec.dllm.policies.learn2pd import Learn2PD
from specdec.dllm.policies.localleap import LocalLeap
from specdec.dllm.policies.one import One
from specdec.dllm.policies.threshold import Threshold
from specdec.errors import InputError

POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (One, Threshold, LocalLeap, Credit, AdaBlock, Learn2PD)
}


def make_policy(name: str, **options) -> Policy:
    """The policy `name` with its options (None = the policy's default); one-line InputError otherwise."""
    if name not in POLICIES:
        raise InputError(f"unknown policy {name!r} (choose from {', '.join(POLICIES)})")
    return POLICIES[name](**{k: v for k, v in options.items() if v is not None})


__all__ = ["POLICIES", "BlockView", "Policy", "Selection", "make_policy"]
