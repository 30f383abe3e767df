"""The shipped code-model pair (target + draft) trained by `specdec train-lm`; see MODEL_CARD.md."""

from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent
