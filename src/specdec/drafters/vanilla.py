"""No drafting: every step scores the root alone. The engine's autoregressive baseline."""

from __future__ import annotations

from specdec.drafters.base import Drafter, register
from specdec.tree import DraftTree


@register
class Vanilla(Drafter[None]):
    name = "vanilla"
    drafts = False

    def propose(self, state: None, context: list[int], max_depth: int) -> DraftTree:
        return DraftTree.root_only(context[-1])
