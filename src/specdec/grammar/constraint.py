"""What a request's output must match: a JSON Schema, any JSON, a regex, a context-free grammar or a choice
among strings, compiled by llguidance (the grammar engine: docs/structured.md says why this one).

A `Constraint` is plain data (it travels in `SamplingParams`, through the API, the CLI and the server);
`compile` turns it into a matcher for one generation against the target's tokenizer, whose llguidance view
is built once per tokenizer (it walks the whole vocabulary). Every error a user can make (a schema llguidance
cannot compile, a regex or grammar that does not parse) is an `InputError` of one line, at `check` time.
"""

from __future__ import annotations

import functools
import json
import weakref
from dataclasses import dataclass
from typing import Any

from specdec.errors import InputError

KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")
# JSON's whitespace between tokens: at most this much per gap (pretty-printing fits), so that a model cannot
# spend every remaining token on spaces and newlines, which unbounded JSON whitespace lets it do
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,20}"
SYNTAXES = ("lark", "gbnf")


@dataclass(frozen=True)
class Constraint:
    """The output's language. `value`: the schema (a dict or its JSON text) for json_schema, nothing for
    json_object, the pattern for regex, the grammar's text for grammar, the strings (a tuple) for choice."""

    kind: str
    value: Any = None
    # json_schema: refuse a schema keyword the engine does not implement (False: ignore it, so the output may
    # be looser than the schema); OpenAI's `strict`
    strict: bool = True
    syntax: str = "lark"  # grammar: Lark (llguidance's own dialect) or GBNF (llama.cpp's; converted to Lark)

    @classmethod
    def json_schema(cls, schema: dict | str, strict: bool = True) -> Constraint:
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema), strict)

    @classmethod
    def json_object(cls) -> Constraint:
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, text: str, syntax: str = "lark") -> Constraint:
        return cls("grammar", text, syntax=syntax)

    @classmethod
    def choice(cls, options: list[str] | tuple[str, ...]) -> Constraint:
        return cls("choice", tuple(options))

    def check(self) -> None:
        """InputError (one line) unless the constraint compiles (checked once per constraint: a request's
        parameters are validated where it arrives and again where it starts)."""
        try:
            error = _validation_error(self)
        except TypeError:  # a value given as a list (unhashable): checked without the cache
            error = _validation_error.__wrapped__(self)
        if error:
            raise InputError(f"invalid {self.describe()}: {_one_line(error)}")

    def describe(self) -> str:
        return {"grammar": f"{self.syntax} grammar", "json_object": "JSON"}.get(
            self.kind, self.kind.replace("_", " ")
        )

    def llguidance_grammar(self) -> str:
        """The constraint as llguidance's grammar text; InputError where it is malformed before compiling."""
        from llguidance import LLMatcher, grammar_from

        kind, value = self.kind, self.value
        if kind not in KINDS:
            raise InputError(f"unknown constraint kind {kind!r} (choose from {', '.join(KINDS)})")
        if kind == "json_object":
            return LLMatcher.grammar_from_json_schema(
                {"type": "object"}, overrides={"whitespace_pattern": JSON_WHITESPACE}
            )
        if not isinstance(value, str | tuple | list) or not value:
            raise InputError(f"the {self.describe()} constraint is empty")
        if kind == "json_schema":
            if not isinstance(value, str):
                raise InputError("the JSON schema must be a JSON object (or its text)")
            try:
                schema = json.loads(value)
            except ValueError as e:
                raise InputError(f"the JSON schema is not valid JSON: {e}") from None
            if not isinstance(schema, dict):
                raise InputError("the JSON schema must be a JSON object")
            return LLMatcher.grammar_from_json_schema(
                schema, overrides={"whitespace_pattern": JSON_WHITESPACE, "lenient": not self.strict}
            )
        if kind == "choice":
            if any(not isinstance(s, str) or not s for s in value):
                raise InputError("every choice must be a non-empty string")
            return grammar_from("choice", json.dumps(list(value)))
        if kind == "grammar" and self.syntax not in SYNTAXES:
            raise InputError(f"unknown grammar syntax {self.syntax!r} (choose from {', '.join(SYNTAXES)})")
        try:
            return grammar_from("regex" if kind == "regex" else self.syntax, value)  # type: ignore[arg-type]
        except ValueError as e:
            raise InputError(f"invalid {self.describe()}: {_one_line(str(e))}") from None


@functools.lru_cache(maxsize=256)
def _validation_error(constraint: Constraint) -> str:
    """llguidance's message about the constraint's grammar ("" when it compiles)."""
    from llguidance import LLMatcher

    return LLMatcher.validate_grammar(constraint.llguidance_grammar())


def _one_line(message: str) -> str:
    return " ".join(message.split())[:300]


# tokenizer object -> {vocabulary size: llguidance's view of it}
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def ll_tokenizer(tokenizer, vocab_size: int, eos_ids: set[int]):
    """llguidance's view of the target's tokenizer over the model's `vocab_size` logits (ids past the
    tokenizer's are never allowed), ending where the engine's EOS ids are; built once per tokenizer (it walks
    every token: ~0.05 s for the shipped 8k vocabulary)."""
    import llguidance.hf

    from specdec.models.gguf_target import LlamaCppTokenizer

    views = _TOKENIZERS.setdefault(tokenizer, {})
    key = (vocab_size, tuple(sorted(eos_ids)))
    if key not in views:
        eos = sorted(eos_ids) or None
        if isinstance(tokenizer, LlamaCppTokenizer):  # the file's own vocabulary, through llama.cpp
            import warnings

            import llguidance.llamacpp

            with warnings.catch_warnings():  # it reads each token's attributes by a deprecated name
                warnings.simplefilter("ignore", DeprecationWarning)
                views[key] = llguidance.llamacpp.lltokenizer_from_vocab(
                    tokenizer.vocab, n_vocab=vocab_size, eos_token=eos
                )
        else:
            try:
                views[key] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
            except ValueError as e:  # a slow (Python) tokenizer
                raise InputError(f"constrained decoding needs a fast tokenizer: {e}") from None
    return views[key]
