"""Shared fixtures, and each test module's layer.

The layers are pytest markers (registered in pyproject.toml): `unit`, `integration`, `e2e` by module, here,
so a new test file must be classified in LAYERS before the suite runs; `slow` cuts across them and is put on
single tests in their files (`@pytest.mark.slow`) or on a whole module by SLOW_MODULES. The fast layer is
`python -m pytest -m "not slow"`; plain `python -m pytest` (what CI runs) runs everything.
"""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# unit: pure logic, no model forward or tiny ones only. integration: engine + model + runtime (greedy
# equality, sampling statistics, caches). e2e: the command line, the server, the bench, training runs.
LAYERS: dict[str, str] = {
    "test_api_inputs": "unit",
    "test_checks": "unit",
    "test_costmodel": "unit",
    "test_heads": "unit",
    "test_imports": "unit",
    "test_streaming": "unit",
    "test_timing": "unit",
    "test_tree_cache": "unit",
    "test_yardstick": "unit",
    "test_auto": "integration",
    "test_batch": "integration",
    "test_cuda": "integration",
    "test_dllm": "integration",
    "test_drafters_lookahead_layerskip": "integration",
    "test_drafters_recycle_suffix_merge": "integration",
    "test_eagle": "integration",
    "test_engine_greedy": "integration",
    "test_engine_seams": "integration",
    "test_heads_cost": "integration",
    "test_hydra": "integration",
    "test_learned": "integration",
    "test_gguf_target": "integration",
    "test_llamacpp": "integration",
    "test_medusa": "integration",
    "test_model_classes": "integration",
    "test_native": "integration",
    "test_prefix_cache": "integration",
    "test_sampling": "integration",
    "test_scale": "integration",
    "test_shipped": "integration",
    "test_structured": "integration",
    "test_bench": "e2e",
    "test_cli": "e2e",
    "test_export": "e2e",
    "test_first_run": "e2e",
    "test_server": "e2e",
    "test_server_deadlines": "e2e",
    "test_train": "e2e",
}
# Modules whose every test is slow (their shared set-up alone is): marked here rather than test by test.
SLOW_MODULES: frozenset[str] = frozenset(
    {
        "test_first_run",  # one subprocess per command, each importing torch and transformers
        "test_server_deadlines",  # every test waits out the server's deadlines on real sockets
        "test_shipped",  # loads the shipped models
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks every test with its module's layer (and `slow` for SLOW_MODULES); a module LAYERS does not name,
    or a name there that is no module, stops the run: an unclassified file would silently fall out of every
    `-m` layer."""
    here = Path(__file__).parent
    stale = sorted(name for name in LAYERS.keys() | SLOW_MODULES if not (here / f"{name}.py").is_file())
    if stale:
        raise pytest.UsageError(f"tests/conftest.py names test modules that do not exist: {', '.join(stale)}")
    unknown = sorted({item.path.stem for item in items if item.path.stem not in LAYERS})
    if unknown:
        raise pytest.UsageError(
            f"test modules without a layer: {', '.join(unknown)}; add each to LAYERS in tests/conftest.py"
        )
    for item in items:
        name = item.path.stem
        item.add_marker(LAYERS[name])
        if name in SLOW_MODULES:
            item.add_marker("slow")


@pytest.fixture(scope="session")
def tok():
    from tiny import tokenizer

    return tokenizer()
