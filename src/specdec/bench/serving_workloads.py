"""The request streams `specdec bench-serve` sends (`--workloads`), built the same way for every server
configuration so that their answers can be compared prompt by prompt.

- `present`: independent completions cycled from the task suites (the original workload). Each request
  starts with a line naming its round and index, so no two share a prefix and the prefix cache is never hit:
  the numbers measure decoding, as before the cache existed.
- `shared-prefix`: every request is one long shared text (a held-out source file, about 1,000 tokens, as a
  system prompt or an attached file would be) followed by its own short question. All but the first can
  start from the cached shared part.
- `multi-turn`: conversations of several turns, one per client at a time: each turn resends the whole
  history (the earlier turns and the server's own answers) plus a new line, as chat clients do. Later turns
  can start from their own cached history.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WORKLOADS = ("present", "shared-prefix", "multi-turn")
TURNS = 4  # turns per conversation
QUESTIONS = [
    "\n\n# Q: which function above is the longest?\ndef ",
    "\n\n# Q: write a test for the first class above\ndef test_",
    "\n\n# Q: what does the module import?\nimports = [",
    "\n\n# Q: summarize the file in one line\n# A:",
    "\n\n# Q: add type hints to the first function\ndef ",
    "\n\n# Q: list the public names\n__all__ = [",
]
FOLLOW_UPS = [
    "\n# next: and the second one?\n",
    "\n# next: shorter, please\n",
    "\n# next: now as a docstring\n",
]


@dataclass
class Conversation:
    """Turns sent one after another by one client; `opening` is the first prompt, each later turn the
    history so far plus a follow-up line."""

    opening: str
    follow_ups: list[str] = field(default_factory=list)


def build(
    workload: str, pool: list[str], long_text: str, requests: int, round_tag: str
) -> list[Conversation]:
    """`requests` requests in all, as conversations (a single-turn conversation per request except for
    multi-turn); `round_tag` makes the texts of one round unique (a round's requests never find the previous
    round's answers in the cache)."""
    if workload == "present":
        return [Conversation(f"# request {round_tag}-{i}\n{pool[i % len(pool)]}") for i in range(requests)]
    if workload == "shared-prefix":
        return [
            Conversation(f"{long_text}{QUESTIONS[i % len(QUESTIONS)]}# ({round_tag}-{i})\n")
            for i in range(requests)
        ]
    if workload == "multi-turn":
        conversations = []
        for c in range(max(1, requests // TURNS)):
            opening = f"# conversation {round_tag}-{c}\n{pool[c % len(pool)]}"
            conversations.append(
                Conversation(opening, [FOLLOW_UPS[t % len(FOLLOW_UPS)] for t in range(TURNS - 1)])
            )
        return conversations
    raise ValueError(workload)
