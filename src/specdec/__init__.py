"""specdec: lossless speculative decoding for Hugging Face causal LMs."""

from specdec.api import Generation, SamplingParams, SpecDecoder, Stats, Stream
from specdec.dllm.api import DllmDecoder
from specdec.drafters import Drafter, Request, make_drafter, methods
from specdec.errors import InputError, UnsupportedModelError
from specdec.grammar import Constraint
from specdec.tree import DraftTree

__version__ = "0.1.0"
__all__ = [
    "Constraint",
    "DllmDecoder",
    "DraftTree",
    "Drafter",
    "Generation",
    "InputError",
    "Request",
    "SamplingParams",
    "SpecDecoder",
    "Stats",
    "Stream",
    "UnsupportedModelError",
    "make_drafter",
    "methods",
]
