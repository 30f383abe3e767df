"""Load a target or draft model by name: "default" is the shipped pair, anything else goes to from_pretrained.

dtype "auto" (the default) loads a checkpoint saved in bfloat16 in bfloat16 where the CPU has bf16 units
(AVX512-BF16 or AMX: there the native runtime's bfloat16 forward is the fastest, docs/runtime.md), as
transformers loads a checkpoint in its own dtype, and everything else in float32: a CPU without bf16 units runs
16-bit weights slower than float32, and so does float16 on any CPU. The shipped models stay float32 (their
bench tables, and the share of numerical ties in their lossless check, are float32's).
"""

from __future__ import annotations

import gc
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from specdec.errors import InputError
from specdec.models.gguf_target import GGUFTarget, load_gguf, quantized
from specdec.models.shipped import SHIPPED_DIR

log = logging.getLogger("specdec")

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
SHIPPED_NAMES = {
    "default": "target",
    "default-target": "target",
    "default-draft": "draft",
    "default-dllm": "dllm",  # the block-diffusion conversion of the target (specdec.dllm)
}


def resolve(name: str | None, role: str = "target") -> str:
    """'default' (or None) -> the shipped model of this role; otherwise the path or hub name unchanged."""
    if name is None or name == "default":
        shipped = SHIPPED_DIR / role
    elif name in SHIPPED_NAMES:
        shipped = SHIPPED_DIR / SHIPPED_NAMES[name]
    else:
        return name
    if not (shipped / "config.json").exists():
        raise InputError(
            f"the shipped {role} model is not in this installation ({shipped}); pass --model/--draft PATH"
        )
    return str(shipped)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str, local_files_only: bool = False):
    """The model's tokenizer; None for a local directory that ships none. A tokenizer that is there but does
    not load is an error, never silently dropped."""
    from transformers import AutoTokenizer

    local = Path(path)
    if local.is_dir() and not any((local / f).exists() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"cannot load the tokenizer of {path!r}: {str(e).splitlines()[0]}") from None


def auto_dtype(config, shipped: bool) -> str:
    """The dtype "auto" loads a checkpoint in (module docstring)."""
    from specdec.runtime.kernels import bf16_units

    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    bf16 = str(saved).removeprefix("torch.") == "bfloat16"
    return "bfloat16" if bf16 and not shipped and bf16_units() else "float32"


def load_causal_lm(name: str | None, role: str = "target", dtype: str = "auto"):
    """Returns (model, tokenizer-or-None); one-line InputError for anything the user can fix."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in DTYPES and dtype != "auto":
        raise InputError(f"unknown dtype {dtype!r} (choose from auto, {', '.join(DTYPES)})")
    path = resolve(name, role)
    local = Path(path).expanduser()
    if local.exists():
        path = str(local)
    if is_gguf(local):  # llama.cpp's format: the file is the model, its tokenizer included
        if dtype != "auto":
            raise InputError(
                f"--dtype {dtype} does not apply to a GGUF file: it runs in the file's own types"
            )
        return load_gguf(local)
    # a hub name off the hub: the cache only, at once (the hub's client retries for ~20 s before giving up)
    offline = not local.exists() and HUB_NAME.fullmatch(path) is not None and hub_unreachable()
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=bool(offline))
    except (OSError, ValueError) as e:
        if offline:
            raise InputError(
                f"model {path!r} is not available offline: no such directory, not in the local Hugging Face "
                f"cache, and {offline}"
            ) from None
        if not local.exists():
            raise InputError(
                f"model {path!r} not found: no such directory, and not a model in the local Hugging Face cache"
            ) from None
        raise InputError(f"cannot load a model config from {path!r}: {str(e).splitlines()[0]}") from None
    kind = type(config).__name__.removesuffix("Config")
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise InputError(f"{path!r} holds a {kind} model, not a causal LM")
    saved_as = getattr(config, "architectures", None) or []
    if saved_as and not any("CausalLM" in name or "LMHead" in name for name in saved_as):
        raise InputError(f"{path!r} holds a {saved_as[0]} (no language-model head), not a causal LM")
    if dtype == "auto":
        dtype = auto_dtype(config, shipped=Path(path).resolve().is_relative_to(SHIPPED_DIR.resolve()))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], output_loading_info=True, local_files_only=bool(offline)
        )
        # transformers types from_pretrained as returning the model alone, even with output_loading_info=True
        model, info = cast("tuple[Any, dict[str, Any]]", loaded)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load model weights from {path!r}: {str(e).splitlines()[0]}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise InputError(
            f"{path!r} lacks weights for {len(missing)} parameters (e.g. {missing[0]}): not a usable causal LM"
        )
    model.eval()
    return model, load_tokenizer(path, local_files_only=bool(offline))


def is_gguf(path: Path) -> bool:
    """A GGUF file (llama.cpp's format), by its magic bytes."""
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # a directory, or nothing there
        return False


HUB_CONNECT_SECONDS = 2.0
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # a repo id ("org/name", "gpt2"), not a path


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached ("HF_HUB_OFFLINE is set", "... cannot be reached"), or
    None: one TCP connection to it (or to the proxy that reaches it), at most HUB_CONNECT_SECONDS."""
    import os
    import socket
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return f"{var} is set"
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        target = urllib.parse.urlsplit(proxy if "//" in proxy else f"//{proxy}")
    else:
        target = endpoint
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=HUB_CONNECT_SECONDS).close()
    except (OSError, ValueError):
        return f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached"
    return None


@dataclass
class LoadedModels:
    target: Any
    tokenizer: Any
    draft: Any | None  # a draft model, loaded when one was named or wanted (see `load_models`)
    draft_name: str | None
    head: str | None = None  # a trained head's directory, when the named draft is one (see `load_models`)


def freeze_heap() -> None:
    """For the long-running commands (bench, serve), once the models are loaded: collect, then move every
    object alive out of the garbage collector's sight (`gc.freeze`). The imports and models leave ~400k tracked
    objects, and a full collection over them is a pause (docs/methods.md, auto), landing in whichever generation
    happened to trigger it (a bench method, a served request). Frozen objects are still freed by reference counting."""
    gc.collect()
    gc.freeze()


def load_models(
    model: str | None = "default",
    draft: str | None = None,
    with_draft: bool = False,
    dtype: str = "auto",
    draft_is_head: bool = False,
    quantize: str | None = None,
) -> LoadedModels:
    """The one loader of the API, CLI, bench and server.

    The draft rule: a named `draft` is loaded as a draft model, or, when it names a trained head
    (`draft_is_head`: the chosen methods draft with a head, none with a second model), passed on as the head's
    directory; otherwise, when a draft model is wanted (`with_draft`: a chosen method drafts with one) and the
    target is the shipped one, the shipped draft comes with it (the two are trained as a pair). Anything else
    has no draft; `require_draft` turns that into an error for the methods that cannot run without one.

    `quantize` ("q8_0", "q4_k_m"): the target becomes the GGUF file of the model quantized so
    (`gguf_target.quantized`, cached), said in one line: what is lossless from then on is that file's decoding.
    """
    target, tokenizer = load_causal_lm(model, "target", dtype)
    if tokenizer is None:
        raise InputError(f"{model!r} has no tokenizer (specdec needs one to encode prompts and decode text)")
    if quantize is not None:
        target, tokenizer = _quantized(target, tokenizer, model, "target", quantize)
    if draft is not None and is_head_dir(draft):  # a head, whatever the method (auto hands it to its eagle)
        return LoadedModels(target, tokenizer, None, None, head=draft)
    if draft is not None and draft_is_head and not with_draft:
        return LoadedModels(target, tokenizer, None, None, head=draft)
    if draft is None and with_draft and model in (None, "default") and (SHIPPED_DIR / "draft").is_dir():
        draft = "default"
    draft_model = None
    if draft is not None:
        draft_model, draft_tokenizer = load_causal_lm(draft, "draft", dtype)
        if quantize is not None and not isinstance(draft_model, GGUFTarget):  # the pair in one format
            draft_model, draft_tokenizer = _quantized(draft_model, draft_tokenizer, draft, "draft", quantize)
        check_same_vocabulary(target, tokenizer, draft_model, draft_tokenizer)
    return LoadedModels(target, tokenizer, draft_model, draft)


def _quantized(model, tokenizer, name: str | None, role: str, kind: str):
    """(the GGUF file of `model` quantized to `kind`, its tokenizer): said in one line, since what is lossless
    from then on is that file's decoding."""
    if isinstance(model, GGUFTarget):
        if role == "draft":
            return model, tokenizer  # a GGUF draft is used as it is
        raise InputError("--quantize takes a Hugging Face model: a GGUF file is already quantized as it is")
    path = quantized(model, tokenizer, resolve(name, role), kind)
    log.warning(
        "specdec: the %s is now %s, %r quantized to %s by llama.cpp%s",
        role,
        path,
        name,
        kind.upper(),
        ": outputs are lossless against that file's decoding, not the original weights'"
        if role == "target"
        else "",
    )
    return load_gguf(path)


def is_head_dir(path: str) -> bool:
    """A trained head's directory (its config.json names a head architecture), not a causal LM."""
    import json

    from specdec.heads import eagle3, medusa

    config = Path(path) / "config.json"
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(a in (*eagle3.ARCHITECTURES, medusa.ARCHITECTURE) for a in architectures)


def draft_roles(methods: list[str]) -> tuple[bool, bool]:
    """(a chosen method drafts with a second model, a chosen method drafts with a trained head)."""
    from specdec.drafters import REGISTRY

    chosen = [REGISTRY[m] for m in methods if m in REGISTRY]
    return any(c.needs_draft_model for c in chosen), any(c.uses_head for c in chosen)


def require_draft(methods: list[str], draft_model) -> None:
    """InputError naming the first method that needs a draft model when there is none."""
    from specdec.drafters import REGISTRY

    for m in methods:
        if m in REGISTRY and REGISTRY[m].needs_draft_model and draft_model is None:
            raise InputError(f"the {m} method needs a draft model (--draft PATH, or --draft default)")


def check_same_vocabulary(target, target_tok, draft, draft_tok) -> None:
    """Draft token ids must mean the same tokens as the target's, or its drafts are nonsense."""
    t_vocab = target.config.get_text_config(decoder=True).vocab_size
    d_vocab = draft.config.get_text_config(decoder=True).vocab_size
    if t_vocab != d_vocab:
        raise InputError(f"draft and target vocabularies differ: {d_vocab} vs {t_vocab} token ids")
    if draft_tok is not None and target_tok is not None and draft_tok.get_vocab() != target_tok.get_vocab():
        raise InputError("draft and target vocabularies differ: their tokenizers map tokens to different ids")
