"""`specdec bench --yardstick`: how much a copy drafter's τ owes to the shipped model repeating itself.

The shipped target is small and repetitive, which flatters drafters that copy the context. This mode runs the
drafters that read only tokens (no target logits or hidden states) teacher-forced, with no target at all: each
step the drafter proposes a tree, the reference text decides how deep it is accepted (greedy acceptance against
the reference instead of the target's argmax), and the reference's next token is the bonus, so τ = tokens per
step is what speculative decoding would get on a target that wrote exactly the reference. Two references per
prompt, side by side:

- the real continuation: what the held-out file actually says after the prompt (for `complete` and `long`),
  or the known answer of an `edit` request (the function again, renamed as asked); `multiturn` has none;
- the model's own greedy output (what `specdec bench` decodes and verifies).

A stronger model writes text closer to the real continuation than to the shipped model's output, so the first
column is the better guide to what a copy drafter gives it.

The trained heads (eagle, medusa, hydra) read the target's hidden states, so they cannot run without it: they
go through the real engine and the real target forward (`specdec.bench.forcing.ForcedTarget`), whose verdict alone
is replaced by the reference's. Along the accepted path the target has then read exactly the reference text, so a head drafts
from the target's hidden states of that text, as it would for a target that wrote it. Their trees have a fixed
`HEAD_NODES` drafted nodes (not the cost model's choice), so their τ is the same on any machine.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.acceptance import _descend
from specdec.bench.forcing import forced_generation
from specdec.drafters import make_drafter
from specdec.drafters.base import Drafter, Request, Scored
from specdec.sampling import SamplingParams

TOKEN_ONLY = (
    "pld",
    "suffix",
)  # drafters whose proposals depend on tokens alone (no logits, no hidden states)
HEADS = ("eagle", "medusa", "hydra")  # drafters that read the target's hidden states: run through the target
# drafted nodes a head's tree gets here: fixed, so that τ measures what the head knows, not what this machine's
# cost model let it verify (with the measured cost, Medusa's trees were the root alone on every prompt)
HEAD_NODES = 16

_RENAMED = re.compile(r"\n\n# The function above again, unchanged except that it is renamed to (\w+):\n")
_PARAM = re.compile(r"\n\n# The function above again, with the parameter `(\w+)` renamed to `(\w+)`:\n")


def real_continuation(task: str, prompt: str, source: str, roots: dict[str, str] | None = None) -> str | None:
    """The text that really follows `prompt`: the held-out file's next text (complete, long), the known answer
    of an edit request, or None (multiturn, or the file is not on this machine)."""
    if task == "edit":
        return _edit_answer(prompt)
    if task not in ("complete", "long"):
        return None
    from specdec.train.corpus import default_roots

    label, _, rel = source.partition("/")
    base = (roots or default_roots()).get(label)
    if base is None:
        return None
    try:
        text = (Path(base) / rel).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text[len(prompt) :] if text.startswith(prompt) else None


def _edit_answer(prompt: str) -> str | None:
    """The function in the prompt written again with the requested change, after the prompt's `def name(`."""
    for pattern in (_RENAMED, _PARAM):
        found = pattern.search(prompt)
        if found is None:
            continue
        code = prompt[: found.start()]
        if pattern is _PARAM:
            old, new = found.group(1), found.group(2)
            code = re.sub(rf"\b{re.escape(old)}\b", new, code)
        opened = code.find("(")
        return code[opened + 1 :] if opened >= 0 else None
    return None


def _truth(reference: list[int], at: int, depths: list[int]) -> Callable[[int], int]:
    """node -> the reference token a node at its depth must equal, `at` tokens into the reference."""
    return lambda node: reference[at + depths[node]]


def teacher_forced_tau(drafter: Drafter, prompt_ids: list[int], reference: list[int]) -> float:
    """Tokens per step of `drafter` when the reference decides acceptance (module docstring)."""
    if not reference:
        return 0.0
    params = SamplingParams(max_new_tokens=len(reference))
    state = drafter.start(Request(list(prompt_ids), params, torch.Generator().manual_seed(0)))
    drafter.prefilled(state, {})
    context, emitted, steps = list(prompt_ids), 0, 0
    try:
        while emitted < len(reference):
            room = len(reference) - emitted - 1  # the bonus token always fits
            tree = drafter.propose(state, context, room).truncate_depth(room)
            verdict = _descend(tree, _truth(reference, emitted, tree.depths))
            # no target, so no verification to time (verify_seconds 0: not measured); these drafters read none
            drafter.observe(state, Scored(tree, verdict, torch.empty(0), verify_seconds=0.0))
            context += verdict.tokens
            emitted += len(verdict.tokens)
            steps += 1
    finally:
        drafter.release(state)
    return emitted / steps


def forced_tau(engine, prompt_ids: list[int], reference: list[int]) -> float:
    """Tokens per target forward of the engine's drafter when the reference decides acceptance
    (`specdec.bench.forcing`)."""
    if not reference:
        return 0.0
    run = forced_generation(engine, prompt_ids, reference)
    generation = run.generation
    assert generation.token_ids == reference, "a forced generation must emit the reference"
    return generation.stats.mean_accepted_tokens


@dataclass
class YardstickRow:
    task: str
    drafter: str
    prompts: int  # prompts with a real continuation
    tau_real: float  # mean over prompts, teacher-forced on the real continuation
    tau_model: float  # the same prompts, on the model's own greedy output


MIN_REFERENCE = 8  # tokens of real continuation a prompt needs to give a τ worth averaging


def head_engines(model, tokenizer, heads=HEADS, nodes: int = HEAD_NODES) -> tuple[dict, dict[str, str]]:
    """(name -> engine with `nodes` drafted nodes a step, for the heads that load for this model; name -> why
    not, for the others)."""
    from specdec.api import SpecDecoder
    from specdec.errors import InputError

    engines, skipped = {}, {}
    for name in heads:
        try:
            engines[name] = SpecDecoder(model, tokenizer, method=name, max_nodes=nodes).engine
        except InputError as e:  # no head for this model (the shipped heads fit the shipped target alone)
            skipped[name] = str(e)
    return engines, skipped


def run_yardstick(
    prompts, model, tokenizer, max_new_tokens: int, drafters=TOKEN_ONLY, heads=None, progress=None
):
    """Rows per task and drafter over `prompts` (BenchPrompt with text) that have a real continuation.
    `heads`: name -> engine of the head drafters to run through the target too (`head_engines`)."""
    from specdec.api import SpecDecoder

    greedy = SpecDecoder(model, tokenizer, method="suffix")  # lossless: the model's greedy output, faster
    per: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for p in prompts:
        if progress is not None:
            progress(p.task)
        text = p.text
        real = real_continuation(p.task, text, p.source) if text is not None else None
        if text is None or real is None:
            continue
        real = real[: 16 * max_new_tokens]  # plenty of characters for max_new_tokens tokens
        prompt_ids = tokenizer(text)["input_ids"]
        joint = tokenizer(text + real)["input_ids"]
        if joint[: len(prompt_ids)] == prompt_ids:
            real_ids = joint[len(prompt_ids) :]
        else:  # the boundary merged two tokens: the continuation on its own
            real_ids = tokenizer(real, add_special_tokens=False)["input_ids"]
        real_ids = real_ids[:max_new_tokens]
        if len(real_ids) < MIN_REFERENCE:  # the file ends about where the prompt was cut: nothing to compare
            continue
        own = greedy.generate(prompt_ids, max_new_tokens=len(real_ids)).token_ids
        for name in drafters:
            d = make_drafter(name)
            pair = (teacher_forced_tau(d, prompt_ids, real_ids), teacher_forced_tau(d, prompt_ids, own))
            per.setdefault((p.task, name), []).append(pair)
        for name, engine in (heads or {}).items():
            pair = (forced_tau(engine, prompt_ids, real_ids), forced_tau(engine, prompt_ids, own))
            per.setdefault((p.task, name), []).append(pair)
    rows = []
    for (task, name), pairs in per.items():
        rows.append(
            YardstickRow(
                task,
                name,
                len(pairs),
                statistics.fmean(a for a, _ in pairs),
                statistics.fmean(b for _, b in pairs),
            )
        )
    return rows


def table(rows: list[YardstickRow]) -> str:
    lines = [
        "| task | drafter | prompts | τ on the real continuation | τ on the model's own output |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.task} | {r.drafter} | {r.prompts} | {r.tau_real:.2f} | {r.tau_model:.2f} |")
    return "\n".join(lines)
