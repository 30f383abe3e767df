"""Bench prompts: the built-in suites, Spec-Bench questions and user prompt files, as one list of `BenchPrompt`.

A chat prompt's later turns need the first answer in their context. The bench uses the model's OWN answer:
the tokens hf-vanilla produced for the previous turn in the same run (with greedy decoding, the model's greedy
answer, which every lossless method reproduces). Spec-Bench's "reference" answers are not used: they were
written by other models, and feeding them would measure how well a method copies text it did not produce.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import specdec.checks as checks
from specdec.errors import InputError

CUSTOM = "custom"


@dataclass
class BenchPrompt:
    task: str  # the group it is reported under: a suite name, a Spec-Bench category, or a file's "kind"
    source: str  # where it came from (held-out file, "question 81 turn 2", "prompts.jsonl:3")
    text: str | None = None  # a plain prompt, tokenized as is
    turns: list[str] = field(default_factory=list)  # chat prompt: user turns; all but the last are answered
    previous: int | None = None  # index of the prompt whose hf-vanilla answer goes before the last turn
    max_new_tokens: int | None = None  # per-prompt override (prompt files only)
    reference: str | None = None  # the text that really follows `text`, where known (`specdec bench --scale`)

    def render(self, tokenizer, answers: list[str]) -> list[int]:
        """Token ids; `answers` are the decoded hf-vanilla answers to the earlier turns, oldest first."""
        if self.text is not None:
            return tokenizer(self.text)["input_ids"]
        messages = []
        for i, turn in enumerate(self.turns):
            messages.append({"role": "user", "content": turn})
            if i < len(self.turns) - 1:
                messages.append({"role": "assistant", "content": answers[i]})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template wrote any BOS itself


def suites() -> list[str]:
    """The built-in task suites shipped in `specdec/bench/tasks/`."""
    folder = resources.files("specdec.bench") / "tasks"
    return sorted(p.name.removesuffix(".jsonl") for p in folder.iterdir() if p.name.endswith(".jsonl"))


def load_suite(name: str) -> list[BenchPrompt]:
    if name not in suites():
        raise InputError(f"unknown task {name!r} (choose from {', '.join(suites())})")
    text = (resources.files("specdec.bench") / "tasks" / f"{name}.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [
        BenchPrompt(
            task=row["kind"], source=row["source"], text=row["prompt"], reference=row.get("reference")
        )
        for row in rows
    ]


def load_prompts_file(path: Path) -> list[BenchPrompt]:
    """Any JSONL of {"prompt": ...}; optional "kind" (the task it is grouped under), "max_new_tokens" and
    "reference" (the prompt's real continuation, for `--scale`)."""
    from specdec.cliargs import read_prompts_file

    prompts = []
    for row in read_prompts_file(path):
        fixed = sorted(set(row) & {"temperature", "top_k", "top_p", "seed", "stop"})
        if fixed:
            raise InputError(
                f"{path}:{row['line']}: the bench runs every prompt with the same sampling settings "
                f"(command-line options); remove {', '.join(fixed)}"
            )
        if row.get("max_new_tokens") is not None:
            checks.integer(
                f"{path}:{row['line']}: max_new_tokens", row["max_new_tokens"], 1, error=InputError
            )
        kind = row.get("kind", CUSTOM)
        if not isinstance(kind, str) or not kind:
            raise InputError(f'{path}:{row["line"]}: "kind" must be a non-empty string')
        reference = row.get("reference")
        if reference is not None and (not isinstance(reference, str) or not reference):
            raise InputError(f'{path}:{row["line"]}: "reference" must be a non-empty string')
        prompts.append(
            BenchPrompt(
                kind,
                f"{path.name}:{row['line']}",
                row["prompt"],
                max_new_tokens=row.get("max_new_tokens"),
                reference=reference,
            )
        )
    return prompts


def load_spec_bench(path: Path, tokenizer, per_category: int | None = None) -> list[BenchPrompt]:
    """Spec-Bench's question.jsonl (question_id, category, turns[, reference]): one prompt per turn.

    Grouped by category; `per_category` keeps the first N questions of each (all their turns).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError(
            "Spec-Bench questions are chat prompts, and this model's tokenizer has no chat template "
            "(use a chat model, or --prompts-file with plain prompts)"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"cannot read Spec-Bench questions {str(path)!r}: {e.strerror or e}") from None
    prompts: list[BenchPrompt] = []
    taken: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            qid, category, turns = row["question_id"], row["category"], row["turns"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(
                f"{path}:{number}: expected a Spec-Bench question (question_id, category, turns)"
            ) from None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise InputError(f"{path}:{number}: 'turns' must be a non-empty list of strings")
        if per_category is not None and taken.get(category, 0) >= per_category:
            continue
        taken[category] = taken.get(category, 0) + 1
        for k in range(len(turns)):
            previous = len(prompts) - 1 if k else None
            prompts.append(
                BenchPrompt(str(category), f"question {qid} turn {k + 1}", None, turns[: k + 1], previous)
            )
    if not prompts:
        raise InputError(f"{path} holds no Spec-Bench questions")
    return prompts
