"""`specdec bench`: the report's schema, the plot, the task suites, and that a lossy method is caught."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer, LlamaForCausalLM

from specdec.acceptance import Verdict
from specdec.bench import build_tasks
from specdec.bench.methods import Method, Run, SpecdecMethod
from specdec.bench.runner import TIE_GAP, Mismatch, diagnose, first_difference, run_bench
from specdec.bench.tasks import BenchPrompt, load_spec_bench, load_suite, suites
from specdec.cli import main
from specdec.drafters import REGISTRY, Drafter, make_drafter, methods
from specdec.errors import InputError
from specdec.sampling import SamplingParams
from specdec.train.corpus import is_held_out
from specdec.tree import DraftTree

import tiny

PROMPTS = [
    {"prompt": "def add(a, b):\n    return a + b\n", "kind": "code"},
    {"prompt": "class Point:\n    def __init__(self, x):\n", "kind": "code"},
    {"prompt": "x = 1\ny = 2\nz = x + y\n"},  # no kind: grouped under "custom"
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    target, draft, chat = root / "target", root / "draft", root / "chat"
    tiny.model("llama").save_pretrained(target)  # float64: greedy comparisons are exact, never ties
    tiny.tokenizer().save_pretrained(target)
    tiny.model("llama", seed=5, hidden=16, layers=1).save_pretrained(draft)
    tiny.tokenizer().save_pretrained(draft)
    tiny.model("llama").save_pretrained(chat)
    tok = AutoTokenizer.from_pretrained(target)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(chat)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return {"target": target, "draft": draft, "chat": chat, "prompts": prompts, "root": root}


def bench(capsys, dirs, *extra):
    argv = ["bench", "--model", dirs["target"], "--dtype", "float64", "--prompts-file", dirs["prompts"]]
    code = main([str(a) for a in [*argv, "--max-new-tokens", 8, *extra]])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_bench_report_schema_and_plot(capsys, dirs, tmp_path):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code, out, err = bench(capsys, dirs, "--draft", dirs["draft"], "--json", out_json, "--plot", out_png)
    assert code == 0, err
    data = json.loads(out_json.read_text())

    env = data["env"]
    for key in ("cpu", "torch_threads", "torch", "transformers"):
        assert env[key]
    assert env["model"]["class"] == "LlamaForCausalLM" and env["model"]["parameters"] > 0
    assert env["model"]["dtype"] == "float64" and env["draft"]["parameters"] > 0

    # Every registered specdec method runs (or is skipped with a reason) next to transformers' three.
    ran = data["settings"]["methods"]
    assert ran[:3] == ["hf-vanilla", "hf-prompt-lookup", "hf-assisted"]
    assert set(ran) | set(data["skipped_methods"]) == {
        "hf-vanilla",
        "hf-prompt-lookup",
        "hf-assisted",
        *methods(),
        "llamacpp",
        "llamacpp-lookup",
    }
    assert {"draft", "pld", "vanilla"} <= set(ran)
    assert "float64" in data["skipped_methods"]["llamacpp"]  # no GGUF type: skipped, and says why

    rows = data["results"]
    assert [(r["task"], r["method"]) for r in rows] == [(t, m) for t in ("code", "custom") for m in ran]
    for row in rows:
        assert row["lossless"] is True and row["mismatches"] == 0 and row["numerical_ties"] == 0
        assert row["speedup"] > 0 and row["median_speedup"] > 0 and row["tokens_per_second"] > 0
        assert row["mean_accepted_tokens"] >= 1.0
        assert row["prompts"] == (2 if row["task"] == "code" else 1)
    base = [r for r in rows if r["method"] == "hf-vanilla"]
    assert all(r["speedup"] == 1.0 and r["mean_accepted_tokens"] == 1.0 for r in base)
    assert [r["method"] for r in data["overall"]] == ran
    # Raw runs: one per prompt x method, all equal to transformers' greedy output token for token.
    runs = data["runs"]
    assert len(runs) == len(PROMPTS) * len(ran) and all(r["match"] for r in runs)
    assert all(r["new_tokens"] == 8 and r["seconds"] > 0 for r in runs)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "overall" in out and "hf-assisted" in out and "lossless" in out


class FixedChain(Drafter):
    """Drafts the same token three times, whatever the context."""

    name = "broken"

    def propose(self, state, context, max_depth):
        return DraftTree.chain(context[-1], [7] * min(3, max_depth))


def accept_everything(tree, logits):
    """A broken verifier: follows the first child at every node, then the argmax after the last one."""
    path = [0]
    while tree.children[path[-1]]:
        path.append(tree.children[path[-1]][0])
    return Verdict(path, [tree.tokens[i] for i in path[1:]] + [int(logits[path[-1]].argmax())])


def test_bench_catches_a_lossy_method(capsys, dirs, tmp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, "broken", FixedChain)  # a new drafter shows up in the bench by itself
    monkeypatch.setattr("specdec.engine.verify_greedy", accept_everything)
    out_json = tmp_path / "r.json"
    code, out, err = bench(capsys, dirs, "--methods", "broken,pld", "--json", out_json, "--warmup", 0)
    assert code == 1
    assert "LOSSLESS CHECK FAILED" in err and "MISMATCH: broken" in err
    data = json.loads(out_json.read_text())
    assert data["settings"]["methods"] == ["hf-vanilla", "broken", "pld"]
    broken = [r for r in data["results"] if r["method"] == "broken"]
    assert broken and all(r["lossless"] is False and r["mismatches"] >= 1 for r in broken)
    assert "NO:" in out
    mismatches = data["mismatches"]  # the broken verifier serves pld too, whose drafts may also slip through
    assert "broken" in {m["method"] for m in mismatches}

    model = LlamaForCausalLM.from_pretrained(dirs["target"])
    tok = tiny.tokenizer()
    for m in mismatches:
        ids = tok(PROMPTS[m["prompt"]]["prompt"])["input_ids"]
        reference = tiny.hf_greedy(model, ids, 8)
        assert m["expected"] == reference[m["position"]] and m["got"] != m["expected"]
        # Diagnosed with a fresh forward: the reference token is the target's argmax there, by a clear margin.
        assert m["top1"] == m["expected"] and m["gap"] > TIE_GAP and m["numerical_tie"] is False
        assert f"prompt {m['index']}" in err


class Scripted(Method):
    """A fake method: fixed tokens, and the seconds of each successive run from a script."""

    family = "specdec"

    def __init__(self, name: str, tokens: list[int], seconds: list[float]) -> None:
        self.name, self.tokens, self.seconds = name, tokens, iter(seconds)

    def run(self, prompt_ids, params, force=None):
        return Run(list(self.tokens), next(self.seconds), len(self.tokens))


def test_repeats_keep_each_methods_fastest_round_and_check_every_round():
    model, tok = tiny.model("llama"), tiny.tokenizer()
    prompts = [BenchPrompt("code", "a", text="def f(x):\n"), BenchPrompt("code", "b", text="x = 1\n")]
    base = Scripted("hf-vanilla", [5, 6, 7], [1.0, 0.9, 1.1, 2.0, 2.0, 2.0])
    fast = Scripted("fast", [5, 6, 7], [0.8, 0.4, 0.6, 1.0, 0.7, 0.9])
    # wrong only in the second round of the first prompt: still one mismatch, and the record says so
    slips = Scripted("slips", [5, 6, 7], [0.5, 0.1, 0.5, 1.0, 1.0, 1.0])
    tokens = iter([[5, 6, 7], [5, 9, 7], [5, 6, 7], [5, 6, 7], [5, 6, 7], [5, 6, 7]])
    slips.run = lambda ids, params, force=None: Run(next(tokens), next(slips.seconds), 3)
    params = SamplingParams(max_new_tokens=3)
    result = run_bench(prompts, [base, fast, slips], model, tok, params, warmup=0, repeats=3)
    seconds = {(r.prompt, r.method): r.seconds for r in result.records}
    assert seconds == {
        (0, "hf-vanilla"): 0.9,
        (0, "fast"): 0.4,
        (0, "slips"): 0.1,
        (1, "hf-vanilla"): 2.0,
        (1, "fast"): 0.7,
        (1, "slips"): 1.0,
    }
    match = {(r.prompt, r.method): r.match for r in result.records}
    assert match[(0, "slips")] is False and match[(1, "slips")] is True and match[(0, "fast")] is True
    assert [(m.prompt, m.method, m.position) for m in result.mismatches] == [(0, "slips", 1)]


class Learner(Scripted):
    """Learns across requests: the number of prompts it has run, which every round must start from."""

    def __init__(self, name: str, tokens: list[int], seconds: list[float]) -> None:
        super().__init__(name, tokens, seconds)
        self.seen, self.starts = 0, []

    def snapshot(self):
        return self.seen

    def restore(self, snapshot):
        self.seen = snapshot

    def run(self, prompt_ids, params, force=None):
        self.starts.append(self.seen)
        self.seen += 1
        return super().run(prompt_ids, params)


def test_every_round_starts_from_the_state_before_the_prompt():
    model, tok = tiny.model("llama"), tiny.tokenizer()
    prompts = [BenchPrompt("code", "a", text="def f(x):\n"), BenchPrompt("code", "b", text="x = 1\n")]
    base = Scripted("hf-vanilla", [5, 6], [1.0] * 6)
    learner = Learner("learner", [5, 6], [0.5] * 6)
    run_bench(prompts, [base, learner], model, tok, SamplingParams(max_new_tokens=2), warmup=0, repeats=3)
    assert learner.starts == [0, 0, 0, 1, 1, 1] and learner.seen == 2


def test_a_specdec_methods_snapshot_forgets_what_came_after_it():
    """suffix indexes earlier requests: without the restore, the same prompt again is drafted from its own
    earlier answer (fewer forwards); after it, exactly as the first time."""
    model, tok = tiny.model("llama", seed=3), tiny.tokenizer()
    method = SpecdecMethod("suffix", model, tok)
    prompt, params = list(range(5, 25)), SamplingParams(max_new_tokens=24, ignore_eos=True)
    snapshot = method.snapshot()
    first = method.run(prompt, params)
    again = method.run(prompt, params)
    method.restore(snapshot)
    restored = method.run(prompt, params)
    assert first.token_ids == again.token_ids == restored.token_ids
    assert again.target_forwards < first.target_forwards == restored.target_forwards
    auto = SpecdecMethod("auto", model, tok)
    auto.restore(auto.snapshot())
    assert auto.decoder.engine.drafter.model is model  # the model is shared, not copied


def test_a_snapshot_shares_prepacked_weights():
    """EAGLE's drafting head keeps oneDNN-packed weights, which deepcopy cannot copy: a snapshot holds what
    the drafter learned (its calibration), not its head, and a restore leaves the head in place."""
    import torch

    from specdec.runtime import select_runtime

    model = tiny.model("llama", seed=3, dtype=torch.float32)  # (oneDNN packs float32 weights only)
    drafter = make_drafter("eagle", head=tiny.untrained_head("eagle", model))
    drafter.bind(model, select_runtime(model, hidden_states=True))  # the runtime an engine gives eagle
    packed = drafter.packed
    assert packed is not None and packed.wqkv.packed is not None
    snapshot = drafter.snapshot_learned()
    drafter.calibration.record(-0.1, True)
    drafter.restore_learned(snapshot)
    assert drafter.packed is packed and packed.wqkv.packed is not None
    assert drafter.calibration.seen == snapshot["calibration"].seen == [0.0] * drafter.calibration.BUCKETS
    assert drafter.calibration is not snapshot["calibration"]  # a copy: the snapshot serves the next restore


def test_sampled_bench_has_no_lossless_verdict(capsys, dirs, tmp_path):
    out_json = tmp_path / "r.json"
    code, _, err = bench(
        capsys,
        dirs,
        "--methods",
        "pld",
        "--temperature",
        "0.9",
        "--top-k",
        "20",
        "--json",
        out_json,
        "--warmup",
        0,
    )
    assert code == 0, err
    data = json.loads(out_json.read_text())
    assert data["settings"]["temperature"] == 0.9 and data["settings"]["seed"] == 0
    for row in data["results"]:
        assert row["lossless"] is None and row["lossless_note"].startswith("n/a (sampled")
    assert all(r["match"] is None for r in data["runs"]) and data["mismatches"] == []


def test_diagnosis_labels_only_genuine_ties():
    class Stub:
        tie_gap = TIE_GAP

        def __init__(self, top1, top2, gap):
            self.answer = (top1, top2, gap)

        def top2(self, ids):
            return self.answer

    where = {"prompt": 0, "task": "t", "index": 0, "source": "s", "method": "m"}
    ref, got = [1, 2, 3], [1, 2, 4]
    assert first_difference(ref, got) == 2 and first_difference(ref, ref) is None
    assert first_difference([1, 2], [1, 2, 0]) == 2
    tie = diagnose(Stub(3, 4, TIE_GAP / 10), [9], ref, got, 2, where)
    assert tie.numerical_tie and (tie.expected, tie.got) == (3, 4)
    assert not diagnose(Stub(3, 4, TIE_GAP * 10), [9], ref, got, 2, where).numerical_tie
    assert not diagnose(
        Stub(3, 5, TIE_GAP / 10), [9], ref, got, 2, where
    ).numerical_tie  # 4 is not in the top 2
    stopped = diagnose(Stub(3, 4, 0.0), [9], ref, ref[:2], 2, where)
    assert stopped.got is None and not stopped.numerical_tie
    assert isinstance(tie, Mismatch)


def test_ties_are_shown_and_do_not_fail(monkeypatch):
    from specdec.bench import report
    from specdec.bench.runner import BenchResult, Record

    class M:
        def __init__(self, name):
            self.name = name

    records = [
        Record(
            0,
            "t",
            0,
            "s",
            name,
            5,
            4,
            1.0 if name == "hf-vanilla" else 0.5,
            4 if name == "hf-vanilla" else 2,
            name == "hf-vanilla",
        )
        for name in ("hf-vanilla", "pld")
    ]
    tie = Mismatch(0, "t", 0, "s", "pld", 1, 3, 4, 3, 4, 1e-6, True)
    rows, overall = report.summarize(
        BenchResult(records, [tie], [M("hf-vanilla"), M("pld")], {}), sampled=False
    )
    pld = rows[1]
    assert pld["lossless"] is True and pld["numerical_ties"] == 1 and pld["mismatches"] == 0
    assert pld["speedup"] == 2.0 and pld["median_speedup"] == 2.0 and pld["mean_accepted_tokens"] == 2.0
    assert pld["tokens_per_second"] == 8.0
    assert "yes (1 numerical tie)" in report.table(rows, overall)


def test_spec_bench_turn_two_holds_the_models_own_answer(capsys, dirs, tmp_path, monkeypatch):
    questions = tmp_path / "question.jsonl"
    rows = [
        {
            "question_id": 1,
            "category": "writing",
            "turns": ["Write a poem.", "Now shorter."],
            "reference": ["x", "y"],
        },
        {"question_id": 2, "category": "math", "turns": ["What is 2+2?"]},
        {"question_id": 3, "category": "writing", "turns": ["Another one.", "Again."]},
    ]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    render = BenchPrompt.render

    def spy(self, tokenizer, answers):
        seen.append((list(self.turns), list(answers)))
        return render(self, tokenizer, answers)

    monkeypatch.setattr(BenchPrompt, "render", spy)
    argv = ["bench", "--model", dirs["chat"], "--dtype", "float64", "--spec-bench", questions, "--prompts", 1]
    code = main([str(a) for a in [*argv, "--methods", "vanilla", "--max-new-tokens", 6, "--warmup", 0]])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert [t for t, _ in seen] == [["Write a poem."], ["Write a poem.", "Now shorter."], ["What is 2+2?"]]

    tok = AutoTokenizer.from_pretrained(dirs["chat"])
    first = tok(
        tok.apply_chat_template(
            [{"role": "user", "content": "Write a poem."}], tokenize=False, add_generation_prompt=True
        ),
        add_special_tokens=False,
    )["input_ids"]
    model = LlamaForCausalLM.from_pretrained(dirs["chat"])
    answer = tok.decode(tiny.hf_greedy(model, first, 6), skip_special_tokens=True)
    assert seen[1][1] == [answer]  # the model's own greedy answer, not the reference "x"


def test_spec_bench_needs_a_chat_template(dirs, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "c", "turns": ["hi"]}) + "\n")
    with pytest.raises(InputError, match="chat template"):
        load_spec_bench(questions, tiny.tokenizer())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "nope"], "unknown method"),
        (["--methods", "draft"], "need(s) a draft model"),
        (["--tasks", "nope"], "unknown task"),
        (["--prompts", "0"], "--prompts must be"),
        (["--repeats", "0"], "--repeats must be"),
        # 0 once ran the whole bench with 128 tokens
        (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1 (got 0)"),
        (["--max-new-tokens", "-3"], "max_new_tokens must be an integer >= 1"),
        (["--warmup", "-1"], "--warmup must be"),
        (["--top-k", "-1"], "top_k must be"),
        (["--top-p", "0"], "top_p must be"),
        (["--temperature", "nan"], "temperature must be a finite number"),
        (["--threads", "0"], "--threads: must be >= 1"),
        (["--json", "/nonexistent-dir/x.json"], "no such directory"),
    ],
)
def test_bench_user_errors(capsys, dirs, extra, message):
    code, _, err = bench(capsys, dirs, *extra)
    assert code == 2 and message in err and "Traceback" not in err


def test_prompts_file_rejects_per_prompt_sampling(capsys, dirs, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "temperature": 0.5}) + "\n")
    code = main(["bench", "--model", str(dirs["target"]), "--prompts-file", str(bad)])
    _, err = capsys.readouterr()
    assert code == 2 and "bad.jsonl:1" in err and "temperature" in err


def test_context_overflow_is_refused_before_timing(capsys, dirs, tmp_path):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "x = 1\n" * 400}) + "\n")  # > the tiny model's 512 positions
    code = main(["bench", "--model", str(dirs["target"]), "--prompts-file", str(long), "--methods", "pld"])
    _, err = capsys.readouterr()
    assert code == 2 and "exceed the model's context of 512" in err


def test_shipped_suites_come_from_held_out_files():
    assert suites() == ["complete", "edit", "long", "multiturn"]
    for name in suites():
        prompts = load_suite(name)
        assert 10 <= len(prompts) <= 20
        for p in prompts:
            assert p.task == name and is_held_out(p.source) and p.text
    for p in load_suite("edit") + load_suite("multiturn"):
        assert p.text.rstrip().endswith("(")  # ends at the start of the requested copy
    for p in load_suite("complete"):
        assert p.text.endswith('"""\n') or p.text.endswith("'''\n") or p.text.endswith('"\n')


def _held_out_names(n: int) -> list[str]:
    names, i = [], 0
    while len(names) < n:
        name = f"stdlib/pkg/mod{i}.py"
        if is_held_out(name):
            names.append(name)
        i += 1
    return names


def _module(k: int, functions: int) -> str:
    parts = [f'"""Module {k}."""\n\nimport os\n']
    for j in range(functions):
        parts.append(
            f"\n\ndef func_{k}_{j}(path, count=3):\n"
            f'    """Return the first {j} parts of path {k}, joined back together."""\n'
            f"    parts = path.split(os.sep)\n    head = parts[:count]\n    if not head:\n"
            f"        return ''\n    total = {j} + len(head)\n    return os.sep.join(head) * total\n"
        )
    return "".join(parts)


def test_build_tasks_is_deterministic_and_reads_held_out_files_only(tmp_path):
    names = _held_out_names(6)
    root = tmp_path / "lib"
    for k, name in enumerate(names):
        path = root / name.removeprefix("stdlib/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_module(k, 40 if k < 3 else 4))
    trained_on = root / "pkg" / "trained.py"  # present on disk, not held out: must never be read
    trained_on.write_text(_module(99, 40))
    manifest = {"held_out_files": names}
    roots = {"stdlib": str(root)}
    first = build_tasks.build(manifest, tiny.tokenizer(), roots)
    second = build_tasks.build(manifest, tiny.tokenizer(), roots)
    assert first == second
    assert set(first) == {"complete", "edit", "long", "multiturn"}
    for task, rows in first.items():
        assert rows, task
        for row in rows:
            assert set(row) == {"prompt", "kind", "source"} and row["kind"] == task
            assert row["source"] in names and "func_99" not in row["prompt"]
    build_tasks.write(first, tmp_path / "out")
    assert len((tmp_path / "out" / "edit.jsonl").read_text().splitlines()) == len(first["edit"])

    with pytest.raises(SystemExit, match="held out"):
        build_tasks.build({"held_out_files": ["stdlib/pkg/trained.py"]}, tiny.tokenizer(), roots)


class Refuses(Drafter):
    """A drafter that cannot serve this model: it says so (InputError) on its first step."""

    name = "refuses"

    def propose(self, state, context, max_depth):
        raise InputError("refuses: needs trained heads this model does not have")


@pytest.mark.slow
def test_default_methods_that_refuse_are_skipped_with_the_reason(capsys, dirs, tmp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, "refuses", Refuses)
    out_json = tmp_path / "r.json"
    code, _, err = bench(capsys, dirs, "--json", out_json)  # default selection, no draft model
    assert code == 0, err
    data = json.loads(out_json.read_text())
    assert "refuses" not in data["settings"]["methods"] and "pld" in data["settings"]["methods"]
    assert "trained heads" in data["skipped_methods"]["refuses"] and "skipped refuses" in err
    assert "draft" not in data["settings"]["methods"] and "hf-assisted" not in data["settings"]["methods"]
    assert (
        data["skipped_methods"]["hf-assisted"]
        == data["skipped_methods"]["draft"]
        == ("needs a draft model (--draft PATH)")
    )
    code, _, err = bench(capsys, dirs, "--methods", "refuses")  # asked for by name: an error
    assert code == 2 and "trained heads" in err


@pytest.mark.slow
def test_bench_serve_drives_real_servers(capsys, dirs, tmp_path):
    """`specdec bench-serve` end to end on the tiny model: servers started, driven at two concurrencies,
    transformers' batched generate() beside them; the batched server's greedy answers equal the one-at-a-time
    server's."""
    out = tmp_path / "serve.json"
    argv = [
        "bench-serve",
        "--model",
        dirs["target"],
        "--prompts-file",
        dirs["prompts"],
        "--concurrency",
        "1,2",
    ]
    configs = ("speculative", "speculative-nocache", "one-at-a-time", "hf-batched")
    workloads = ("present", "shared-prefix", "multi-turn")
    argv += ["--requests", 3, "--max-tokens", 6, "--configs", ",".join(configs)]
    argv += ["--workloads", ",".join(workloads), "--shared-prefix-chars", 300]
    code = main([str(a) for a in [*argv, "--json", out, "--threads", 1]])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    rows = json.loads(out.read_text())["rows"]
    assert [(r["workload"], r["config"], r["concurrency"]) for r in rows] == [
        (w, c, n) for w in workloads for c in configs for n in (1, 2)
    ]
    for r in rows:
        assert r["requests"] == 4  # the same requests at every N: at least 2 x the largest N (1 x 4 turns)
        assert r["tokens"] > 0 and r["tokens_per_second"] > 0 and r["latency_p95"] >= r["latency_p50"] > 0
        if r["config"] != "hf-batched":  # transformers' float32 batch may differ at a float near-tie
            assert r["mismatches"] == 0 and r["ttft_p50"] is not None and r["tpot_p50"] is not None
        if r["config"] == "speculative-nocache" or r["workload"] == "present":
            assert r["cached_share"] == 0  # no cache, or nothing shared
        elif r["config"] == "speculative":  # batched rows restore from it
            assert r["cached_share"] > 0
        assert (r["later_turn_ttft_p50"] is not None) == (
            r["workload"] == "multi-turn" and r["config"] != "hf-batched"
        )
    assert "speculative" in stdout and "hf-batched" in stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--concurrency", "0,2"], "--concurrency must be integers >= 1"),
        (["--concurrency", "two"], "comma-separated integers"),
        (["--configs", "fast"], "unknown config 'fast'"),
        (["--threads", "0"], "--threads: must be >= 1"),
        (["--json", "/nonexistent-dir/x.json"], "no such directory"),
    ],
)
def test_bench_serve_user_errors(capsys, dirs, extra, message):
    code = main(["bench-serve", "--model", str(dirs["target"]), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_a_run_under_a_third_of_its_methods_usual_pace_is_flagged():
    """One stalled run (10x slower than its method's pace) is flagged; a prompt slower for every method (a long
    one) is not, since each run is measured against the other methods on its prompt."""
    from specdec.bench import report
    from specdec.bench.runner import BenchResult, Record

    speeds = {"pld": 2.0, "vanilla": 1.0, "suffix": 2.5}  # tokens per second, times each prompt's pace
    pace = [100.0, 100.0, 100.0, 100.0, 10.0]  # prompt 4 is slow for everyone

    def record(prompt: int, method: str) -> Record:
        rate = speeds[method] * pace[prompt] / (10 if (method, prompt) == ("pld", 2) else 1)
        return Record(prompt, "edit", prompt, "s", method, 5, 10, 10 / rate, 5, True)

    records = [record(p, m) for p in range(5) for m in speeds]
    flagged = report.slow_runs(BenchResult(records, [], [], {}))
    assert [(s["method"], s["prompt"]) for s in flagged] == [("pld", 2)]
    assert flagged[0]["tokens_per_second"] == 20.0 and flagged[0]["prompt_median"] == 100.0


def test_structured_bench_reports_validity_and_checks_every_method(capsys, dirs, tmp_path):
    """`--tasks structured`: every method under each prompt's constraint beside constrained generate(), each
    output checked against it, validity and the grammar's share reported (the suite's prompts, on a tiny
    model: what is checked is the table and the lossless verdict, not the text)."""
    out = tmp_path / "structured.json"
    argv = ["bench", "--model", dirs["target"], "--dtype", "float64", "--tasks", "structured", "--prompts", 1]
    argv += ["--max-new-tokens", 24, "--methods", "pld,auto", "--warmup", 0, "--json", out]
    code = main([str(a) for a in argv])
    text, err = capsys.readouterr()
    assert code == 0, err
    rows = json.loads(out.read_text())["rows"]
    overall = {r["method"]: r for r in rows if r["kind"] == "overall"}
    assert set(overall) == {"hf-constrained", "pld", "auto", "auto-unconstrained"}
    assert overall["pld"]["lossless"] is True and overall["auto"]["lossless"] is True
    assert {r["kind"] for r in rows} == {"json-from-code", "tool-args", "config", "identifiers", "overall"}
    assert all(0 <= r["grammar_share"] < 1 for r in rows)
    assert "| overall | auto |" in text


def test_structured_bench_runs_alone(capsys, dirs):
    code, _, err = bench(capsys, dirs, "--tasks", "structured,complete")
    assert code == 2 and "runs alone" in err
