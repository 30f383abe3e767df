"""`specdec bench --tasks structured` with a block-diffusion model (or --policies): each policy decodes the
structured suite under each prompt's constraint and without it. Per policy: validity (a whole sentence of
the constraint; unconstrained output is not checked), tokens per forward, tokens per second, the rate against
the same policy unconstrained, and quality as agreement with `one` under the same constraint (the share of
positions where the two wrote the same token: `one` commits a position a forward, the quality reference).
Under a constraint a block is committed in order (specdec.dllm.grammar), so the policies that decode several
positions a forward lose part of that here; the table says how much."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

from tqdm import tqdm

from specdec.bench.structured import first_of_each, load, timed_generate, valid
from specdec.errors import InputError
from specdec.sampling import SamplingParams

DEFAULT_POLICIES = "one,threshold:threshold=0.9,threshold:threshold=0.5,localleap,credit,adablock"


@dataclass
class DllmRow:
    policy: str
    constrained: bool
    valid: float | None
    tokens_per_forward: float
    tokens_per_second: float
    vs_unconstrained: float | None
    agreement_with_one: float | None


def run(args: argparse.Namespace, params: SamplingParams) -> int:
    from specdec.bench.dllm import policy_configs
    from specdec.dllm.api import DllmDecoder
    from specdec.dllm.cli import engine_options
    from specdec.dllm.policies import make_policy
    from specdec.engine import eos_token_ids
    from specdec.models.loading import load_causal_lm

    configs = policy_configs(args.policies or DEFAULT_POLICIES)
    if "one" not in [label for label, _, _ in configs]:
        configs = [("one", "one", {}), *configs]  # the quality reference
    prompts = first_of_each(load(), args.prompts, args.max_new_tokens)
    model, tokenizer = load_causal_lm(args.model, "target", args.dtype or "auto")
    if tokenizer is None:
        raise InputError(f"{args.model!r} has no tokenizer")
    decoders = {
        label: DllmDecoder(
            model, tokenizer, make_policy(name, **options), name=args.model, **engine_options(args)
        )
        for label, name, options in configs
    }
    eos = eos_token_ids(model, tokenizer)
    vocab = model.get_output_embeddings().weight.shape[0]
    outs: dict[tuple[str, bool], list[tuple[list[int], float, int]]] = {}
    with tqdm(
        total=len(decoders) * (len(prompts) + 1),
        desc="structured dllm",
        unit="run",
        file=sys.stderr,
        disable=None,
    ) as bar:
        for label, decoder in decoders.items():
            for i, prompt in enumerate([prompts[0], *prompts]):  # a warm-up on the first
                for constrained in (True, False):
                    result, seconds = timed_generate(decoder, prompt, prompt.text, params, constrained)
                    if i:
                        run = (result.token_ids, seconds, result.stats.target_forwards)
                        outs.setdefault((label, constrained), []).append(run)
                bar.update(1)
    rows = []
    for label in decoders:
        for constrained in (True, False):
            runs = outs[(label, constrained)]
            tokens = sum(len(t) for t, _, _ in runs)
            rate = tokens / max(1e-9, sum(s for _, s, _ in runs))
            free = outs[(label, False)]
            free_rate = sum(len(t) for t, _, _ in free) / max(1e-9, sum(s for _, s, _ in free))
            ref = outs[("one", constrained)]
            same = sum(
                sum(a == b for a, b in zip(t, r[0], strict=False))
                for (t, _, _), r in zip(runs, ref, strict=True)
            )
            rows.append(
                DllmRow(
                    label,
                    constrained,
                    sum(
                        valid(p, tokenizer, vocab, eos, t) for p, (t, _, _) in zip(prompts, runs, strict=True)
                    )
                    / len(runs)
                    if constrained
                    else None,
                    tokens / max(1, sum(f for _, _, f in runs)),
                    rate,
                    rate / free_rate if constrained else None,
                    same
                    / max(1, sum(max(len(t), len(r[0])) for (t, _, _), r in zip(runs, ref, strict=True))),
                )
            )
    print(table(rows))
    if args.json is not None:
        args.json.write_text(
            json.dumps({"prompts": len(prompts), "rows": [asdict(r) for r in rows]}, indent=1)
        )
    return 0


def table(rows: list[DllmRow]) -> str:
    def f(x, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = [
        "| policy | constrained | valid | tokens/forward | tok/s | x unconstrained | agreement with one |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.policy} | {'yes' if r.constrained else 'no'} | {f(None if r.valid is None else r.valid * 100, '.0f')}% | "
            f"{r.tokens_per_forward:.2f} | {r.tokens_per_second:.1f} | {f(r.vs_unconstrained, '.2f')}x | "
            f"{f(r.agreement_with_one, '.2f')} |"
        )
    return "\n".join(lines)
