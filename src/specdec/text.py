"""Incremental detokenization that never splits a multi-byte character.

Byte-level tokenizers can end a token in the middle of a UTF-8 character; decoding then yields U+FFFD. Text
is released only once the decoded window no longer ends in U+FFFD. A few prompt tokens are decoded along with
the output so that tokenizers which drop a leading space at the start of a sequence (SentencePiece) keep it.

Also what is checked of a text before it is tokenized: that it is text at all (`check_text`, `decode_utf8`),
and the bound on how much text one token can stand for (`max_token_chars`) that lets a prompt far too long for
the context be refused without tokenizing it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import weakref

from specdec.errors import InputError

CONTEXT_TOKENS = 5


class IncrementalText:
    def __init__(self, tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix = 0  # ids[prefix:read] decode to text already released (the reference for the next diff)
        self.read = len(self.ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def finish(self) -> str:
        """All text, including a trailing incomplete character (as U+FFFD) if generation stopped inside one."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        return self.text + after[len(before) :]


def check_text(text: str, what: str = "the prompt") -> None:
    """InputError unless `text` is Unicode text a tokenizer can encode: Python hands undecodable bytes of
    argv, stdin or a file name over as lone surrogates (U+DC80..U+DCFF, `surrogateescape`), and JSON or the
    API may carry any other lone surrogate; tokenizers refuse both with a TypeError from deep inside."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        if 0xDC80 <= code <= 0xDCFF:
            raise InputError(
                f"{what} is not valid UTF-8 (byte 0x{code - 0xDC00:02x} at character {e.start} is not part of a "
                "UTF-8 character)"
            ) from None
        raise InputError(
            f"{what} is not valid Unicode (a lone surrogate U+{code:04X} at character {e.start})"
        ) from None


def decode_utf8(data: bytes, what: str) -> str:
    """UTF-8 bytes as text, a leading BOM dropped (Windows tools write one; it is no part of the text);
    InputError naming the first undecodable byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{what} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start} is not part of a UTF-8 "
            "character)"
        ) from None


# Unicode composition (NFC, NFKC) folds at most this many characters into one: the longest canonical
# decomposition (e.g. U+1F82 = α + 3 combining marks); the decompositions only lengthen the text.
MAX_COMPOSED = 4
_BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))  # SentencePiece's byte fallback pieces
_max_token_chars: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def max_token_chars(tokenizer) -> int | None:
    """The most characters of a text that one of the tokenizer's tokens can stand for, so that a text of n
    characters encodes to at least n / max_token_chars tokens (the length check that needs no tokenizing);
    None where no such bound is certain: a tokenizer that may drop characters (whitespace splitting, an
    unknown character with no unknown token), fold a run into one token (a fused unknown token, an added
    token that strips the spaces around it, a normalizer that strips) or is not a `tokenizers` one."""
    try:
        return _max_token_chars[tokenizer]
    except (KeyError, TypeError):
        pass
    try:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
    except (AttributeError, ValueError):  # a slow (Python) tokenizer
        return None
    bound = _token_bound(spec)
    with contextlib.suppress(TypeError):
        _max_token_chars[tokenizer] = bound
    return bound


def _token_bound(spec: dict) -> int | None:
    folds = _normalizer_folds(spec.get("normalizer"))
    pre = _pre_tokenizer_types(spec.get("pre_tokenizer"))
    model = spec.get("model") or {}
    if folds is None or pre is None or model.get("type") not in ("BPE", "Unigram"):
        return None
    if model["type"] == "BPE":
        pieces = list(model.get("vocab") or {})
    else:
        pieces = [piece for piece, _score in model.get("vocab") or []]
    vocab = set(pieces)
    # every character must become tokens: bytes when it is in no piece (byte-level BPE's 256 byte symbols,
    # or SentencePiece's byte fallback); otherwise it is dropped or folded into an unknown token
    byte_level = "ByteLevel" in pre and set(_byte_level_alphabet()) <= vocab
    byte_fallback = bool(model.get("byte_fallback")) and set(_BYTE_TOKENS) <= vocab
    if not (byte_level or byte_fallback):
        return None
    longest = max((len(p) for p in pieces), default=1)
    for added in spec.get("added_tokens") or []:
        if added.get("lstrip") or added.get("rstrip"):  # it takes any run of spaces beside it along
            return None
        longest = max(longest, len(added.get("content", "")))
    # a piece's characters stand for at most as many normalized characters (a byte-level symbol is one
    # byte, a character at least one), each of them for at most `folds` characters of the text
    return max(longest, 1) * folds


def _normalizer_folds(spec: dict | None) -> int | None:
    """How many characters of the text one normalized character may stand for; None: unbounded or unknown
    (a normalizer that drops characters, e.g. Strip, StripAccents, BertNormalizer's control characters)."""
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        folds = 1
        for member in spec.get("normalizers") or []:
            f = _normalizer_folds(member)
            if f is None:
                return None
            folds *= f
        return folds
    if kind in ("Prepend", "Lowercase", "NFD", "NFKD"):
        return 1  # they add or expand characters, never merge them
    if kind in ("NFC", "NFKC"):
        return MAX_COMPOSED
    if kind == "Replace":
        pattern, content = (spec.get("pattern") or {}).get("String"), spec.get("content") or ""
        if not pattern or not content:  # a regular expression, or a deletion
            return None
        return -(-len(pattern) // len(content))
    return None


def _pre_tokenizer_types(spec: dict | None) -> set[str] | None:
    """The pre-tokenizers' types; None when one may drop characters (whitespace splitting, a delimiter or
    a Split that removes what it matches)."""
    if spec is None:
        return set()
    kind = spec.get("type")
    if kind == "Sequence":
        types: set[str] = set()
        for member in spec.get("pretokenizers") or []:
            t = _pre_tokenizer_types(member)
            if t is None:
                return None
            types |= t
        return types
    if kind in ("ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "FixedLength"):
        return {kind}
    if kind in ("Split", "Punctuation") and spec.get("behavior") != "Removed":
        return {kind}
    return None


@functools.cache
def _byte_level_alphabet() -> tuple[str, ...]:
    from tokenizers import pre_tokenizers

    return tuple(pre_tokenizers.ByteLevel.alphabet())
