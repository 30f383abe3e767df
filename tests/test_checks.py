"""`specdec.checks`: the one rule for a parameter's type and range, and its one-line wording, as the config
objects, the sampling parameters, the dLLM policies and the argparse types use it."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest

import specdec.checks as checks
from specdec.cliargs import integer as integer_type
from specdec.drafters.medusa import MedusaConfig
from specdec.errors import InputError


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: checks.integer("width", True, 1), "width must be an integer >= 1 (got True)"),
        (lambda: checks.integer("width", 1.0, 1), "width must be an integer >= 1 (got 1.0)"),
        (lambda: checks.integer("n", 9, 0, 8), "n must be an integer in [0, 8] (got 9)"),
        (
            lambda: checks.integer("max_nodes", -1, 0, also=("auto",)),
            "max_nodes must be an integer >= 0 or 'auto' (got -1)",
        ),
        (lambda: checks.number("t", math.nan, 0), "t must be a finite number >= 0 (got nan)"),
        (lambda: checks.number("t", math.inf, 0), "t must be a finite number >= 0 (got inf)"),
        (lambda: checks.fraction("top_p", 0), "top_p must be in (0, 1] (got 0)"),
        (lambda: checks.fraction("decay", 1.5, open_low=False), "decay must be in [0, 1] (got 1.5)"),
        (lambda: checks.fraction("p", False), "p must be in (0, 1] (got False)"),
        (lambda: checks.choice("order", "x", ("left", "confidence")), "order must be 'left' or 'confidence'"),
        (
            lambda: checks.choice("cache", [1], ("a", "b", "c")),
            "cache must be one of 'a', 'b', 'c' (got [1])",
        ),
        (lambda: checks.flag("ignore_eos", 1), "ignore_eos must be True or False (got 1)"),
    ],
)
def test_refusals_are_one_line_value_errors(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_accepted_values_come_back_and_the_error_type_is_the_callers():
    assert checks.integer("n", 3, 1) == 3
    assert checks.integer("max_nodes", "auto", 0, also=("auto",)) == "auto"
    assert checks.fraction("p", 1) == 1 and checks.fraction("p", 0, open_low=False) == 0
    assert checks.is_integer(np.int64(3), integral=True) and not checks.is_integer(np.int64(3))
    with pytest.raises(InputError):
        checks.integer("n", 0, 1, error=InputError)
    with pytest.raises(ValueError, match="width must be an integer >= 1"):  # a config object's field
        MedusaConfig(width=0)


def test_the_argparse_type_is_built_on_the_same_rule():
    port = integer_type(0, 65535, "a port number")
    assert port("80") == 80
    with pytest.raises(
        argparse.ArgumentTypeError, match=r"^must be a port number in \[0, 65535\] \(got 70000\)$"
    ):
        port("70000")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^must be >= 1 \(got 0\)$"):
        integer_type(1)("0")
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer >= 1, got 'x'"):
        integer_type(1)("x")
