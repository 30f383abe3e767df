"""The head kinds `specdec train-drafter --method` trains, by name."""

from __future__ import annotations

from specdec.errors import InputError
from specdec.train.eagle_recipe import EagleRecipe
from specdec.train.head_recipe import HeadRecipe
from specdec.train.hydra_recipe import HydraRecipe
from specdec.train.medusa_recipe import MedusaRecipe

RECIPES: dict[str, HeadRecipe] = {r.name: r for r in (EagleRecipe(), MedusaRecipe(), HydraRecipe())}
METHODS = tuple(RECIPES)  # --method choices, the default first


def recipe(method: str) -> HeadRecipe:
    try:
        return RECIPES[method]
    except KeyError:
        raise InputError(f"no head kind {method!r} (expected one of {', '.join(METHODS)})") from None
