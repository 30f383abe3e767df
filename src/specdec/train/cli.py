"""`specdec train-lm`: build the corpus, train the tokenizer and the target/draft pair, export HF directories.

Every stage resumes from what the working directory already holds, so the same command can simply be run
again after an interruption.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from specdec.cliargs import positive_int
from specdec.train.corpus import CorpusConfig

# The budgets the shipped pair was trained with (the target's was cut from 20M to 11M at step 298 to fit a
# session; MODEL_CARD.md records it).
DEFAULT_TOKENS = {"target": 11_000_000, "draft": 12_000_000}


def add_run_arguments(p: argparse.ArgumentParser, workdir: Path) -> None:
    """The options every resumable training command has (train-lm, train-dllm)."""
    p.add_argument("--workdir", type=Path, default=workdir, help="resumable working directory")
    p.add_argument("--stage", choices=["prepare", "train", "export", "all"], default="all")
    p.add_argument("--threads", type=positive_int, default=2)


def add_tokens_argument(p: argparse.ArgumentParser, flag: str, what: str, default: int) -> None:
    """A training-token budget; None (not given) is the default, and a given one moves a resumed run's end."""
    p.add_argument(
        flag,
        type=positive_int,
        default=None,
        help=f"{what} (default {default:,}); given when resuming, it moves the end of the recorded schedule",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, Path("runs/train"))
    p.add_argument("--models", default="draft,target", help="comma-separated subset of: draft,target")
    add_tokens_argument(p, "--target-tokens", "training tokens for the target", DEFAULT_TOKENS["target"])
    add_tokens_argument(p, "--draft-tokens", "training tokens for the draft", DEFAULT_TOKENS["draft"])
    p.add_argument("--stdlib-only", action="store_true", help="leave out installed packages' sources")
    p.add_argument("--export-dir", type=Path, default=None, help="where to write <name>/ HF directories")
    accel = p.add_argument_group("the stronger target's accelerator run (docs/train.md)")
    accel.add_argument(
        "--target-size", default="target", choices=["target", "target-50m"], help="the target's shape"
    )
    accel.add_argument(
        "--strict-corpus",
        action="store_true",
        help="packages with a permissive license only, none that evaluation holds out (corpus.EXCLUDED_PACKAGES "
        "and the bench's packages)",
    )
    accel.add_argument(
        "--tokenizer-from",
        default=None,
        help="use this tokenizer directory (or 'shipped': the shipped target's) instead of training one",
    )
    accel.add_argument(
        "--max-train-tokens", type=positive_int, default=None, help="cut the train split to this many tokens"
    )
    accel.add_argument("--device", default="cpu", help="torch device to train on (cuda on an accelerator)")
    accel.add_argument("--bf16", action="store_true", help="autocast the forward to bfloat16")
    accel.add_argument("--compile", action="store_true", help="torch.compile the forward")
    accel.add_argument(
        "--minutes", type=float, default=None, help="stop each model's run after this wall time, checkpointed"
    )
    accel.add_argument("--batch-tokens", type=positive_int, default=8192, help="tokens per optimizer step")


def run(args: argparse.Namespace) -> int:
    from specdec.train.lm import TrainConfig, export, prepare, train

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for n in names:
        if n not in ("draft", "target"):
            raise SystemExit(f"specdec train-lm: unknown model {n!r} (expected draft or target)")
    if args.stage in ("prepare", "all"):
        tokenizer_from = args.tokenizer_from
        if tokenizer_from == "shipped":
            from specdec.models.shipped import SHIPPED_DIR

            tokenizer_from = SHIPPED_DIR / "target"
        corpus = CorpusConfig(include_site_packages=not args.stdlib_only, strict=args.strict_corpus)
        prepare(
            args.workdir,
            corpus,
            tokenizer_from=Path(tokenizer_from) if tokenizer_from else None,
            max_train_tokens=args.max_train_tokens,
        )
    if args.stage in ("train", "all"):
        for n in names:
            given = args.target_tokens if n == "target" else args.draft_tokens
            lr = 1.5e-3 if n == "target" else 3e-3
            size = args.target_size if n == "target" else n
            cfg = TrainConfig(
                size=size,
                total_tokens=given or DEFAULT_TOKENS[n],
                lr=lr,
                threads=args.threads,
                batch_tokens=args.batch_tokens,
                device=args.device,
                bf16=args.bf16,
                compile=args.compile,
                minutes=args.minutes,
            )
            train(args.workdir, n, cfg, new_budget=given)
    if args.stage in ("export", "all"):
        from specdec.models.shipped import SHIPPED_DIR

        out_root = args.export_dir or SHIPPED_DIR
        for n in names:
            metrics = export(args.workdir, n, out_root / n)
            print(json.dumps({n: {k: v for k, v in metrics.items() if k != "train_config"}}))
        shutil.copyfile(args.workdir / "manifest.json", out_root / "corpus_manifest.json")
        if all((out_root / n / "training_metrics.json").exists() for n in ("target", "draft")):
            from specdec.train.card import write_card

            write_card(out_root, out_root / "corpus_manifest.json")
            print(f"wrote {out_root / 'MODEL_CARD.md'}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m specdec.train", description=__doc__)
    add_arguments(p)
    return run(p.parse_args())
