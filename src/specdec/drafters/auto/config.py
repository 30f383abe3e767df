"""`auto`'s options (`AutoConfig`) and what its members are built with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import specdec.checks as checks


@dataclass
class AutoConfig:
    # candidate members: registered names (comma-separated or a list) or Drafter objects; one needing a draft
    # model joins only when one is given, one refusing the model at bind (InputError) is left out
    # they run in this order, each judged by what it adds to the ones before it: the strongest retrieval member
    # first (suffix finds every match pld does, and more: it was ahead of pld on every bench task), then the
    # cheaper ones as add-ons, then the model drafters, which cost a forward per token, then the trained heads
    # on the final hidden state (a few small products a step; they join where heads exist for the target)
    members: str | list = "suffix,pld,recycle,draft,eagle,hydra,medusa"
    max_nodes: int = 32  # most drafted nodes verified in one step (the cost model usually picks fewer)
    # nodes each retrieval member offers: more than their own defaults (auto cuts), fewer than max_nodes (the
    # cost model verifies far fewer on average, docs/methods.md, and valuing and merging a node costs Python
    # time every step)
    member_nodes: int = 16
    max_depth: int = 8  # deepest node a member is asked for
    # a head given for auto (directory or module: `--draft HEAD_DIR`): the member of its kind (eagle, hydra or
    # medusa) drafts with it; the other head members take the shipped target's heads, where there are any
    head: Any = None
    memory: float = 0.95  # discount per trial of this generation's counts: about the last 20 trials per cell
    shared_memory: float = 0.99  # the same for the counts carried across requests
    warm_weight: float = 8.0  # most pseudo-trials per cell a generation starts with from the shared counts
    probe_overhead: float = 0.002  # share of plain decoding's time a member not worth running may still cost
    # a fixed forward cost per tree size for every runtime (no measuring, no online refinement): for tests, or
    # where measuring at the first generation is unwanted; None: measured per runtime (the default)
    cost: Any = None

    def __post_init__(self) -> None:
        for name in ("max_nodes", "max_depth", "member_nodes"):
            checks.integer(name, getattr(self, name), 0)
        for name in ("memory", "shared_memory", "probe_overhead"):
            checks.fraction(name, getattr(self, name))
        checks.number("warm_weight", self.warm_weight, 0)


def member_options(name: str, config: AutoConfig) -> dict:
    """Members offer more nodes than their fixed budgets: auto picks how many are verified."""
    if name in ("pld", "suffix", "recycle"):
        return {"max_nodes": max(1, config.member_nodes)} | ({"max_candidates": 4} if name == "pld" else {})
    if name in ("eagle", "hydra", "medusa"):
        given = config.head is not None and head_kind(config.head) == name
        return {"head": config.head if given else None}
    return {}


def head_kind(head: Any) -> str:
    """Which head member a given head is for: "hydra" or "medusa" by its config's `model_type` (the heads'
    modules say it as `config.kind`), "eagle" otherwise (an EAGLE-3 head's config says "llama")."""
    config = getattr(head, "config", None)
    if config is not None:
        kind = str(getattr(config, "kind", "")).lower()
    else:
        from specdec.heads.checkpoint import read_config

        kind = str(read_config(head).get("model_type", "")).lower()
    return kind if kind in ("hydra", "medusa") else "eagle"
