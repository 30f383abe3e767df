"""The teacher-forced yardstick (`specdec bench --yardstick`): reference continuations and tau without a target."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from specdec.bench.yardstick import _edit_answer, real_continuation, teacher_forced_tau
from specdec.drafters import make_drafter


def test_tau_counts_reference_tokens_per_step():
    prompt = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]
    repeat = [7, 8, 9, 5, 6, 7, 8, 9]  # continues the repetition: pld drafts it
    novel = [40, 41, 42, 43, 44, 45]  # never seen: nothing drafted matches, one token per step
    tau_repeat = teacher_forced_tau(make_drafter("pld"), prompt, repeat)
    assert tau_repeat >= 2.5
    assert teacher_forced_tau(make_drafter("pld"), prompt, novel) == 1.0
    assert teacher_forced_tau(make_drafter("suffix"), prompt, repeat) >= 2.5


def test_edit_answers_follow_the_request():
    fn = "def area(width, height):\n    return width * height\n"
    renamed = (
        fn + "\n\n# The function above again, unchanged except that it is renamed to area_v2:\ndef area_v2("
    )
    assert _edit_answer(renamed) == "width, height):\n    return width * height\n"
    param = (
        fn + "\n\n# The function above again, with the parameter `width` renamed to `width_value`:\ndef area("
    )
    assert _edit_answer(param) == "width_value, height):\n    return width_value * height\n"
    assert _edit_answer("def f():\n    pass\n") is None


def test_shipped_edit_prompts_all_have_an_answer_and_multiturn_none():
    text = (resources.files("specdec.bench") / "tasks" / "edit.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    for row in rows:
        answer = real_continuation("edit", row["prompt"], row["source"])
        assert answer and answer.rstrip().count("\n") >= 4  # the whole function body
    assert real_continuation("multiturn", "x", "stdlib/json/encoder.py") is None


def test_a_file_continuation_is_what_follows_the_prefix(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("import os\n\n\ndef f():\n    return 1\n")
    roots = {"stdlib": str(tmp_path)}
    assert (
        real_continuation("complete", "import os\n", "stdlib/pkg/m.py", roots)
        == "\n\ndef f():\n    return 1\n"
    )
    assert real_continuation("complete", "import sys\n", "stdlib/pkg/m.py", roots) is None
    assert real_continuation("long", "x", "stdlib/pkg/missing.py", roots) is None


def test_a_prompt_whose_file_ends_there_is_left_out(tmp_path, monkeypatch, tok):
    """Nothing follows the prompt in its file: no reference to force, so no row (and no zero-length decode)."""
    from specdec.bench.tasks import BenchPrompt
    from specdec.bench.yardstick import run_yardstick

    import tiny

    (tmp_path / "m.py").write_text("def f(x):\n    return x + 1\n\n\ndef g(y):\n    return f(y) * 2\n")
    monkeypatch.setattr("specdec.train.corpus.default_roots", lambda: {"stdlib": str(tmp_path)})
    whole = (tmp_path / "m.py").read_text()
    prompts = [
        BenchPrompt("complete", "stdlib/m.py", text=whole[:20]),
        BenchPrompt("long", "stdlib/m.py", text=whole),  # the file ends where the prompt does
    ]
    rows = run_yardstick(prompts, tiny.model("llama").eval(), tok, max_new_tokens=16)
    assert {(r.task, r.prompts) for r in rows} == {("complete", 1)}
    assert all(r.tau_real >= 1.0 and r.tau_model >= 1.0 for r in rows)


@pytest.mark.parametrize("method", ["eagle", "medusa", "hydra"])
def test_a_head_is_forced_along_any_reference_and_along_the_model_output_decodes_as_usual(tok, method):
    """Through the target: forcing emits exactly the reference (forced_tau checks it), whatever the model would
    say; forced along the model's own greedy output the steps are those of ordinary decoding."""
    from specdec.api import SpecDecoder
    from specdec.bench.yardstick import forced_tau

    import tiny

    model = tiny.model("llama", seed=1)
    head = tiny.untrained_head(method, model)
    prompt = [5, 9, 14, 3, 77, 1] * 3
    own = tiny.hf_greedy(model, prompt, 24)

    def engine():
        return SpecDecoder(model, tok, method, head=head, max_nodes=6).engine

    unlike = [(t * 7 + 3) % model.config.vocab_size for t in own]  # not what the model writes
    assert unlike != own
    assert 1.0 <= forced_tau(engine(), prompt, unlike) <= len(unlike)
    decoded = SpecDecoder(model, tok, method, head=head, max_nodes=6).generate(
        prompt, max_new_tokens=len(own), ignore_eos=True
    )
    assert decoded.token_ids == own
    assert forced_tau(engine(), prompt, own) == decoded.stats.mean_accepted_tokens  # (fixed trees: no timing)
