"""The command line's shared pieces: the model and sampling options of every command that loads models, their
argparse types, and the prompts file. Imported by every command module (generate, bench, serve, dllm), so it
imports none of them."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from specdec.errors import InputError
from specdec.text import decode_utf8

PROMPT_LINE_KEYS = {"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "kind"}


def integer(minimum: int, maximum: int | None = None, what: str = "an integer") -> Callable[[str], int]:
    """An argparse type: an integer in [minimum, maximum] (no maximum: >= minimum), refused in one line."""
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    noun = "" if what == "an integer" else f"{what} "

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} {bounds}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {noun}{bounds} (got {value})")
        return value

    return parse


positive_int = integer(1)
non_negative_int = integer(0)
port_number = integer(0, 65535, "a port number")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads models (generate, bench, serve)."""
    p.add_argument(
        "--model", default="default", help="target model path or hub name (default: the shipped code model)"
    )
    p.add_argument(
        "--draft",
        default=None,
        help="draft model for --method draft ('default' = the shipped draft, which the shipped model drafts "
        "with when none is given), or a trained head directory for --method eagle (default: the shipped head, "
        "with the shipped model)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument(
        "--runtime",
        default="auto",
        choices=["auto", "llamacpp", "native", "transformers"],
        help="what runs the target's forwards: 'llamacpp' = llama.cpp over a GGUF conversion (Llama models, the "
        "llamacpp extra; logits only), 'native' = specdec's own fused forward (Llama, Mistral, Qwen2, Qwen3), "
        "'transformers' = the model's own code. Each is checked against transformers at load. 'auto' "
        "(default): the first of those that runs the model (llamacpp only for methods that read no hidden "
        "states), saying in one line why it fell back",
    )
    add_threads_argument(p)


def add_threads_argument(
    p: argparse.ArgumentParser, help: str = "torch threads, >= 1 (default: torch's choice)"
) -> None:
    p.add_argument("--threads", type=positive_int, default=None, help=help)


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int | None = 128) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 = greedy (default); below 1e-5 is greedy too (too small to sample from, as in vLLM)",
    )
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None)


def read_prompts_file(path: Path) -> list[dict]:
    """Validate the whole file before any generation, naming the offending line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read prompts file {str(path)!r}: {e.strerror or e}") from None
    lines = decode_utf8(data, f"prompts file {str(path)!r}").splitlines()  # a BOM dropped
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise InputError(f'{where}: expected an object with a string "prompt"')
        unknown = sorted(set(row) - PROMPT_LINE_KEYS)
        if unknown:
            raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}")
        rows.append({"line": number, **row})
    if not rows:
        raise InputError(f"prompts file {str(path)!r} holds no prompts")
    return rows
