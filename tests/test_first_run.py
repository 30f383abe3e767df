"""The base install (no extras): every command's parser builds, `generate` runs, and `serve` / `bench --plot`
name the extra they need in one line (exit 2) before doing any work.

Each command runs in a subprocess in which FastAPI, uvicorn and matplotlib cannot be imported, which is what
a base install looks like to `import` (the test environment itself has every extra).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import tiny

BASE_INSTALL = """
import sys
for name in ("fastapi", "uvicorn", "matplotlib"):
    sys.modules[name] = None  # `import name` now raises ModuleNotFoundError, as without the extras
from specdec.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """Every command at once (each subprocess spends seconds importing torch and transformers)."""
    out = tmp_path_factory.mktemp("out")
    commands = {
        "help": ["--help"],
        "serve": ["serve", "--model", "/nonexistent/model"],
        # a model that does not exist: had the benchmark started, this would be the error
        "plot": ["bench", "--plot", out / "bench.png", "--model", "/nonexistent/model", "--quick"],
        "generate": [
            "generate",
            "x = 1\n",
            "--model",
            model_dir,
            "--max-new-tokens",
            4,
            "--json",
            "--threads",
            1,
        ],
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", BASE_INSTALL, *map(str, argv)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=out,
        )
        for name, argv in commands.items()
    }
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = (proc.returncode, stdout, stderr)
    return results


def test_help_lists_every_command(runs):
    code, out, err = runs["help"]
    assert code == 0, err
    assert err == ""
    for command in ("generate", "bench", "serve", "train-lm"):
        assert command in out


def test_generate_runs_without_extras(runs):
    code, out, err = runs["generate"]
    assert code == 0, err
    row = json.loads(out)
    assert len(row["token_ids"]) == 4 and row["stats"]["new_tokens"] == 4


def test_serve_names_the_server_extra(runs):
    code, out, err = runs["serve"]
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("specdec: error:"), err
    assert "pip install 'specdec[server]'" in err and "is not installed" in err


def test_plot_names_the_bench_extra_before_benchmarking(runs):
    code, out, err = runs["plot"]
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("specdec: error:"), err
    assert "matplotlib" in err and "pip install 'specdec[bench]'" in err
