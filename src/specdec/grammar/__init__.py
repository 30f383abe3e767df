"""Structured generation: constraints (JSON Schema, JSON, regex, grammars, choices) that every drafter's tree
is pruned by and every verified position is masked by (docs/structured.md)."""

from specdec.grammar.constraint import Constraint
from specdec.grammar.matcher import GrammarState

__all__ = ["Constraint", "GrammarState"]
