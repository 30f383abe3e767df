"""One rule for a parameter's type and range, and one wording for its refusal.

`integer`, `number`, `fraction`, `choice` and `flag` return the value they accept and otherwise raise `error`
with one line, "NAME must be WHAT (got VALUE)". `error` is the caller's: ValueError for a config object's
fields, InputError (a ValueError: the CLI's exit 2, the server's 400) for the user's input,
argparse.ArgumentTypeError inside an argparse type (argparse then names the option itself). A bool is never a
number here, although Python counts True as 1: `max_nodes=True` is a mistake, not a 1.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any

Error = type[Exception]


def is_integer(value: object, integral: bool = False) -> bool:
    """An int and not a bool (`integral`: any numbers.Integral, numpy's integers too)."""
    return isinstance(value, numbers.Integral if integral else int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def bounds(
    minimum: float | None = None,
    maximum: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
) -> str:
    """The range as the messages say it: '>= 1', '> 0', '<= 8', 'in [0, 65535]', 'in (0, 1]' ('' for none)."""
    if minimum is not None and maximum is not None:
        return f"in {'(' if open_low else '['}{minimum}, {maximum}{')' if open_high else ']'}"
    if minimum is not None:
        return f"{'>' if open_low else '>='} {minimum}"
    if maximum is not None:
        return f"{'<' if open_high else '<='} {maximum}"
    return ""


def within(
    value: float,
    minimum: float | None = None,
    maximum: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
) -> bool:
    """`value` lies in the range `bounds` names (False for nan)."""
    low = minimum is None or (value > minimum if open_low else value >= minimum)
    high = maximum is None or (value < maximum if open_high else value <= maximum)
    return bool(low and high)


def refusal(name: str, expected: str, value: object) -> str:
    """'NAME must be EXPECTED (got VALUE)'; without a name (an argparse type): 'must be EXPECTED (got VALUE)'."""
    return " ".join(filter(None, [name, "must be", expected])) + f" (got {value!r})"


def integer(
    name: str,
    value: Any,
    minimum: int | None = None,
    maximum: int | None = None,
    *,
    error: Error = ValueError,
    what: str = "an integer",
    also: Collection[str] = (),
    shown: str | None = None,
) -> Any:
    """`value` if it is an integer in [minimum, maximum] or one of the words in `also` (e.g. 'auto').
    `what`: the noun of the message ('' leaves it out); `shown`: the range as the message says it, where
    `bounds` would spell it less clearly (seeds: 'in [-2**63, 2**64)')."""
    if isinstance(value, str) and value in also:
        return value
    if is_integer(value) and within(value, minimum, maximum):
        return value
    expected = " ".join(filter(None, [what, shown or bounds(minimum, maximum)]))
    raise error(refusal(name, " or ".join([expected, *(repr(w) for w in also)]), value))


def number(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    open_low: bool = False,
    error: Error = ValueError,
    what: str = "a finite number",
) -> Any:
    """`value` if it is a finite int or float in the range (open at `minimum` with `open_low`)."""
    if is_number(value) and math.isfinite(value) and within(value, minimum, maximum, open_low):
        return value
    raise error(refusal(name, " ".join(filter(None, [what, bounds(minimum, maximum, open_low)])), value))


def fraction(name: str, value: Any, *, open_low: bool = True, error: Error = ValueError) -> Any:
    """`value` if it is a number in (0, 1] (open_low=False: in [0, 1])."""
    return number(name, value, 0, 1, open_low=open_low, error=error, what="")


def choice(name: str, value: Any, options: Collection[Any], *, error: Error = ValueError) -> Any:
    """`value` if it is one of `options`: "must be 'a' or 'b'", "must be one of 'a', 'b', 'c'"."""
    # `in` on a tuple compares by ==, so an unhashable value (a list) is refused rather than a TypeError
    options = tuple(options)
    if value in options:
        return value
    names = [repr(o) for o in options]
    expected = " or ".join(names) if len(names) <= 2 else "one of " + ", ".join(names)
    raise error(refusal(name, expected, value))


def flag(name: str, value: Any, *, error: Error = ValueError) -> bool:
    """`value` if it is True or False (not 1, not 'yes')."""
    if isinstance(value, bool):
        return value
    raise error(refusal(name, "True or False", value))
