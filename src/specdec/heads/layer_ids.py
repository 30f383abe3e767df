"""Which target hidden states an EAGLE-3 head's layer ids name, in each engine's own numbering.

The same config field, `eagle_aux_hidden_state_layer_ids`, means different layers to the two engines (their
capture code is cited in docs/export.md):
  - "vllm" (also Hugging Face's `output_hidden_states` index, and specdec's): id i is the INPUT of decoder
    layer i, i.e. HF's hidden_states[i]; 0 is the embeddings.
  - "sglang": id a is the OUTPUT of decoder layer a (SGLang captures the input of layer a + 1), i.e. HF's
    hidden_states[a + 1]; the embeddings have no id.
specdec holds a head's ids in HF numbering (`Eagle3Config.aux_layer_ids`) and translates only at the file
boundary: `for_engine` when exporting, `read` when loading. Where ids sit in config.json matters too: SGLang
reads them from `eagle_config`, vLLM (0.34) from the top level (`eagle_config`'s copy only sizes its fc).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import specdec.checks as checks
from specdec.errors import InputError

SEMANTICS = ("vllm", "sglang")
FIELD = "eagle_aux_hidden_state_layer_ids"
# Written by specdec into every head it saves or exports, so that reading the file back is never a guess.
MARKER = "specdec_layer_id_semantics"
VLLM_ONLY_ARCH = "Eagle3LlamaForCausalLM"  # vLLM registers it; SGLang does not
SGLANG_ARCH = "LlamaForCausalLMEagle3"  # SGLang's name, which vLLM also accepts: ambiguous on its own
# With nothing in the file to go by: SGLang's reading. A head named SGLang's way with ids in eagle_config and
# no marker most likely comes from SGLang's own trainer (SpecForge), the usual source of published heads.
DEFAULT = "sglang"
RECORD = "training_metrics.json"  # specdec's training record: the ids it trained on, in HF numbering

LOG = logging.getLogger("specdec.heads")


@dataclass(frozen=True)
class Reading:
    """How a config.json's layer ids were read."""

    ids: tuple[int, ...]  # in HF numbering (the input of decoder layer i)
    semantics: str  # whose numbering the file's ids were in: "vllm" or "sglang"
    why: str  # what decided it (a field of the file, the training record, the caller, the default)

    def describe(self) -> str:
        return f"{self.semantics} ({self.why})"


def add_argument(p: argparse.ArgumentParser, whose: str = "a --draft head's") -> None:
    """--layer-ids-from, for commands that are given an EAGLE-3 head directory."""
    p.add_argument(
        "--layer-ids-from",
        choices=SEMANTICS,
        default=None,
        help=f"whose numbering {whose} eagle_aux_hidden_state_layer_ids are in, where its files do not say: "
        "'vllm' (= Hugging Face's hidden_states index: the input of layer i) or 'sglang' (the output of layer "
        "i). Default: what config.json says (specdec's marker, vLLM's top-level field or architecture name, "
        "the training record), else sglang, said in one line (docs/export.md)",
    )


def check_choice(given: str | None) -> None:
    if given is not None and given not in SEMANTICS:
        raise InputError(f"unknown layer-id numbering {given!r} (choose from {', '.join(SEMANTICS)})")


def to_hf(ids, semantics: str) -> tuple[int, ...]:
    return tuple(int(i) + (semantics == "sglang") for i in ids)


def for_engine(hf_ids, engine: str, where: str = "the head") -> list[int]:
    """The ids `engine` must be given to capture HF hidden states `hf_ids`."""
    if list(hf_ids) != sorted(set(hf_ids)):  # both capture in layer order (vLLM also drops repeats)
        raise InputError(
            f"{where} reads the target's layers in the order {list(hf_ids)}; the engines concatenate them in "
            "layer order, so only heads with increasing layer ids can be exported"
        )
    if engine == "vllm":
        return [int(i) for i in hf_ids]
    if 0 in hf_ids:
        raise InputError(
            f"{where} reads the target's embeddings (layer id 0), which SGLang cannot capture (its ids name "
            "decoder layers' outputs); export it with --format vllm"
        )
    return [int(i) - 1 for i in hf_ids]


def record_ids(head_dir: Path) -> list[int] | None:
    """The HF layer ids specdec's trainer recorded for this head (its training_metrics.json), if it has one."""
    try:
        record = json.loads((Path(head_dir) / RECORD).read_text())
        ids = record["head_config"]["eagle_config"][FIELD] if record.get("method") == "eagle" else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return [int(i) for i in ids] if isinstance(ids, list) and ids else None


def read(config: dict, where: str, given: str | None = None, record: list[int] | None = None) -> Reading:
    """The HF ids a head's config.json means. The file decides where it can (specdec's marker, vLLM's
    top-level field, vLLM's architecture name, then specdec's training record `record`); `given`
    (--layer-ids-from) must agree with it, and decides only where the file cannot, else `DEFAULT` is taken
    and said in one warning line. Read ids that disagree with the training record are refused."""
    check_choice(given)
    raw, semantics, why = _from_file(config, where)
    if semantics is None and record is not None:
        semantics = next((s for s in SEMANTICS if list(to_hf(raw, s)) == record), None)
        why = f"its training record {RECORD}"
    if semantics is not None and given is not None and given != semantics:
        raise InputError(
            f"{where}: its layer ids {list(raw)} are {semantics}'s ({why}); --layer-ids-from {given} "
            "contradicts that"
        )
    assumed = semantics is None and not given
    if semantics is None:
        semantics, why = (given, "--layer-ids-from") if given else (DEFAULT, _default_why(config))
    reading = Reading(to_hf(raw, semantics), semantics, why)
    if record is not None and list(reading.ids) != record:
        raise InputError(
            f"{where}: its layer ids {list(raw)} read as {semantics}'s name HF layers {list(reading.ids)}, but "
            f"its training record {RECORD} says it was trained on {record}"
        )
    if assumed and raw:
        LOG.warning(
            "%s: layer ids %s read as SGLang's (HF hidden states %s), %s; pass --layer-ids-from vllm if they "
            "are vLLM's (HF's)",
            where,
            list(raw),
            list(reading.ids),
            why,
        )
    return reading


def _from_file(config: dict, where: str) -> tuple[tuple[int, ...], str | None, str]:
    """(the ids as written, whose numbering the file says they are in or None, what says so)."""
    nested = _ids((config.get("eagle_config") or {}).get(FIELD), where)
    top = _ids(config.get(FIELD), where)
    marker = config.get(MARKER)
    if marker is not None:
        if marker not in SEMANTICS:
            raise InputError(f"{where}: {MARKER} is {marker!r}; expected one of {', '.join(SEMANTICS)}")
        return (top if marker == "vllm" and top else nested), marker, f"its {MARKER} field"
    if top:  # a speculators-format config puts them here too (vLLM's own converter)
        kind = "a speculators config's " if "speculators_model_type" in config else ""
        return top, "vllm", f"{kind}top-level {FIELD}, which only vLLM reads"
    archs = config.get("architectures") or []
    if VLLM_ONLY_ARCH in archs and SGLANG_ARCH not in archs:
        return nested, "vllm", f"architecture {VLLM_ONLY_ARCH}, which only vLLM registers"
    return nested, None, ""


def _default_why(config: dict) -> str:
    archs = config.get("architectures") or []
    return f"the default for {archs[0] if archs else 'a config'} with no {MARKER}"


def _ids(value, where: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or not all(checks.is_integer(i) for i in value):
        raise InputError(f"{where}: {FIELD} must be a list of integers (got {value!r})")
    return tuple(value)
