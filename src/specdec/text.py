"""Incremental detokenization that never splits a multi-byte character.

Byte-level tokenizers can end a token in the middle of a UTF-8 character; decoding then yields U+FFFD. Text
is released only once the decoded window no longer ends in U+FFFD. A few prompt tokens are decoded along with
the output so that tokenizers which drop a leading space at the start of a sequence (SentencePiece) keep it.
"""

from __future__ import annotations

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
