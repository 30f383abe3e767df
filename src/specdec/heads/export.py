"""`specdec export-drafter`: a trained head in the checkpoint layout vLLM or SGLang loads.

specdec stores its heads in those engines' layouts already (see eagle3.py and medusa.py for the files they
were matched against), so exporting is: load and validate the head, then write config.json with the
architecture name the chosen engine looks for and the weights in bfloat16 (or the dtype asked for). An
EAGLE-3 head's layer ids are written in the engine's own numbering (layer_ids.py; docs/export.md cites the
capture code): vLLM's are specdec's (HF's `output_hidden_states` index), read from the top level of
config.json; SGLang's are one less (its id a is the output of decoder layer a), read from `eagle_config`. Both
are always written explicitly, with specdec's marker naming the numbering, so no engine falls back to its
default and loading the export back into specdec gives the same drafts (tests/test_export.py). SGLang has no
Medusa loader, so a Medusa export to SGLang is refused, and so is any export of a Hydra head (neither engine
loads one).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from specdec.errors import InputError
from specdec.heads import layer_ids
from specdec.heads.checkpoint import read_config

FORMATS = ("vllm", "sglang")
# The architecture each engine registers for EAGLE-3 (vLLM registers both names; SGLang the first).
EAGLE3_ARCH = {"vllm": "Eagle3LlamaForCausalLM", "sglang": "LlamaForCausalLMEagle3"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def head_kind(path: Path) -> str:
    """'eagle' or 'medusa', from the directory's config.json."""
    from specdec.heads.eagle3 import ARCHITECTURES
    from specdec.heads.hydra import ARCHITECTURE as HYDRA
    from specdec.heads.medusa import ARCHITECTURE as MEDUSA

    archs = read_config(path).get("architectures") or []
    if any(a in ARCHITECTURES for a in archs):
        return "eagle"
    if MEDUSA in archs:
        return "medusa"
    if HYDRA in archs:
        raise InputError(
            f"{path}: a Hydra head, which neither vLLM nor SGLang loads (specdec runs it: --method hydra)"
        )
    raise InputError(f"{path / 'config.json'}: not an EAGLE-3 or Medusa head (architectures {archs})")


def export_drafter(
    source: Path, fmt: str, out: Path, dtype: str = "bfloat16", layer_ids_from: str | None = None
) -> str:
    """Write the head at `source` to `out` for engine `fmt`; returns the head's kind. `layer_ids_from`: whose
    numbering the source's layer ids are in, where its files do not say (layer_ids.read)."""
    from specdec.heads.eagle3 import load_head, save_head
    from specdec.heads.medusa import load_medusa, save_medusa

    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise InputError("--out must be another directory than the head's own")
    kind = head_kind(source)
    if kind == "medusa":
        if layer_ids_from is not None:
            raise InputError(
                "--layer-ids-from is for EAGLE-3 heads (a Medusa head reads the last layer only)"
            )
        if fmt == "sglang":
            raise InputError("SGLang has no Medusa loader; export Medusa heads with --format vllm")
        save_medusa(load_medusa(source), out, DTYPES[dtype])
    else:
        head = load_head(source, layer_ids_from=layer_ids_from)
        ids = layer_ids.for_engine(head.config.aux_layer_ids, fmt, str(source))  # refused before writing
        save_head(head, out, DTYPES[dtype])
        config_path = out / "config.json"
        config = engine_config(json.loads(config_path.read_text()), fmt, ids)
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    for card in ("MODEL_CARD.md", "card.md"):  # the card travels with the weights
        if (source / card).exists():
            shutil.copyfile(source / card, out / card)
    return kind


def engine_config(config: dict, fmt: str, ids: list[int]) -> dict:
    """specdec's config.json (HF ids) as engine `fmt` reads it: its architecture name, and `ids` (already in
    its numbering) where it looks for them. SGLang's file drops the top-level copy vLLM would read as HF's."""
    config = {**config, "architectures": [EAGLE3_ARCH[fmt]], layer_ids.MARKER: fmt}
    config["eagle_config"] = {**config.get("eagle_config", {}), layer_ids.FIELD: ids}
    config.pop(layer_ids.FIELD, None)
    if fmt == "vllm":
        config[layer_ids.FIELD] = ids
    return config


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export-drafter", help="write a trained head (eagle, medusa) in the layout vLLM or SGLang loads"
    )
    p.add_argument(
        "head", type=Path, help="a head directory (from specdec train-drafter, or a published one)"
    )
    p.add_argument("--format", choices=FORMATS, required=True, help="the serving engine that will load it")
    p.add_argument("--out", type=Path, required=True, help="directory to write (created)")
    p.add_argument(
        "--dtype", choices=list(DTYPES), default="bfloat16", help="weight dtype (default bfloat16)"
    )
    layer_ids.add_argument(p, "the head's")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    kind = export_drafter(args.head, args.format, args.out, args.dtype, args.layer_ids_from)
    if kind == "eagle":
        ids = json.loads((args.out / "config.json").read_text())["eagle_config"][layer_ids.FIELD]
        print(
            f"wrote the {kind} head for {args.format} to {args.out} (layer ids {ids}, {args.format}'s numbering)"
        )
    else:
        print(f"wrote the {kind} head for {args.format} to {args.out}")
    return 0
