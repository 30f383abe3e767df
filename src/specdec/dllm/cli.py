"""The command-line options of diffusion decoding, shared by generate, bench and serve."""

from __future__ import annotations

import argparse
from pathlib import Path

from specdec.errors import InputError

# CLI flag (without --) -> (policy parameter, type); a policy given a flag it does not take is a one-line error
POLICY_FLAGS = {
    "threshold": ("threshold", float),
    "relaxed-threshold": ("relaxed_threshold", float),
    "radius": ("radius", int),
    "decay": ("decay", float),
    "credit-weight": ("weight", float),
    "delimiter-threshold": ("delimiter_threshold", float),
    "min-block": ("min_block", int),
    "order": ("order", str),
    "filter": ("filter", str),
}


def add_policy_arguments(p: argparse.ArgumentParser, several: bool = False) -> None:
    """--policy and each policy's flags (generate, serve); or --policies with settings inline (bench)."""
    from specdec.dllm.policies import POLICIES

    g = p.add_argument_group(
        "diffusion LMs (--model default-dllm; not lossless: quality is traded for tokens per forward)"
    )
    if several:
        g.add_argument(
            "--policies",
            default=None,
            help=f"comma-separated policies to compare, each optionally with settings after ':' joined by ';', "
            f"as in one,threshold:threshold=0.7,localleap:radius=3;relaxed_threshold=0.5 (of: "
            f"{', '.join(POLICIES)}; default: one, a threshold sweep 0.9-0.3 and every other policy; with "
            f"--tasks, 'parallel' names the synthetic suite)",
        )
    else:
        g.add_argument("--policy", default=None, help=f"one of: {', '.join(POLICIES)} (default: threshold)")
    g.add_argument("--block-size", type=int, default=None, help="block length (default: the model's)")
    g.add_argument("--sub-block", type=int, default=8, help="positions decodable at a time (default 8)")
    g.add_argument(
        "--cache",
        default="dual",
        choices=["dual", "prefix", "none"],
        help="prefix: committed tokens cached (exact); dual (default): also the block's undecoded rest "
        "(approximate, Fast-dLLM); none: recompute everything every forward",
    )
    g.add_argument(
        "--floor",
        default="left",
        choices=["left", "confidence"],
        help="what a forward commits when the policy picks nothing: the leftmost decodable position (default) or "
        "the most confident one (Fast-dLLM's rule)",
    )
    if several:
        g.add_argument(
            "--ar-model",
            default="default",
            help="the autoregressive model that judges quality and is decoded as the reference (default: the "
            "shipped target)",
        )
        return
    for flag, (_, kind) in POLICY_FLAGS.items():
        g.add_argument(f"--{flag}", type=kind, default=None, help=_help(flag))


def _help(flag: str) -> str:
    from specdec.dllm.policies import POLICIES

    users = [name for name, p in POLICIES.items() if POLICY_FLAGS[flag][0] in p.params]
    first = POLICIES[users[0]].params[POLICY_FLAGS[flag][0]].help
    return f"{first} [{', '.join(users)}]"


def policy_options(args: argparse.Namespace) -> dict:
    """The policy flags the user gave, as the policy's parameter names."""
    out = {}
    for flag, (name, _) in POLICY_FLAGS.items():
        value = getattr(args, flag.replace("-", "_"), None)
        if value is not None:
            out[name] = value
    return out


def engine_options(args: argparse.Namespace) -> dict:
    return {
        "block_size": args.block_size,
        "sub_block": args.sub_block,
        "cache": args.cache,
        "floor": args.floor,
    }


def parse_policy_list(text: str) -> list[tuple[str, str, dict]]:
    """'one,threshold:threshold=0.7' -> [(label, policy, options)]; values as numbers where they parse."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, _, rest = item.partition(":")
        options: dict = {}
        for pair in filter(None, rest.split(";")):
            key, eq, value = pair.partition("=")
            if not eq:
                raise InputError(f"policy setting {pair!r} in {item!r} is not key=value")
            options[key.strip().replace("-", "_")] = _number(value.strip())
        out.append((item, name.strip(), options))
    if not out:
        raise InputError("--policies names no policy")
    return out


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def wants_dllm(model: str | None, policy: str | None) -> bool:
    """A --policy was given, or the model is a block-diffusion checkpoint."""
    from specdec.dllm.model import is_dllm_dir
    from specdec.models.loading import resolve

    if policy is not None:
        return True
    try:
        path = resolve(model)
    except InputError:
        return False
    return is_dllm_dir(Path(path).expanduser())
