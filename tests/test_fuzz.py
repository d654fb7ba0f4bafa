"""A fixed slice of the fuzzing in tests/fuzz/: damaged GGUF files through `plan` and `generate`,
every hostile chat template, random attention calls. The full runs and their figures:
docs/robustness.md."""

import numpy as np

from selfattn.model import template

from .fuzz import calls, run, templates

GGUF_SLICE = 160
CALLS = 1500


def test_damaged_gguf_files_are_refused_in_one_line_or_run():
    results = run.run(range(GGUF_SLICE), seed=1, jobs=2)
    assert len(results) == GGUF_SLICE
    failed = [r for r in results if any(x["outcome"] == "FAILED" for x in r["runs"])]
    assert not failed, [(r["i"], r["what"], [(x["rc"], x["stderr"][-3:]) for x in r["runs"]])
                        for r in failed[:5]]
    counts = run.summary(results)["by_command"]
    assert counts["plan"].get("refused", 0) > 20 and counts["generate"].get("ran", 0) > 5


def test_hostile_chat_templates(monkeypatch):
    monkeypatch.setattr(template, "TIME_S", 1.0)
    outcomes = {name: templates.check(name, source, template.render)
                for name, source in templates.cases().items()}
    assert len(outcomes) >= 200
    must_refuse = set(templates.HAND_WRITTEN) - templates.HARMLESS
    assert {n for n in must_refuse if outcomes[n] != "refused"} == set()
    assert outcomes["a real template"] == "rendered"


def test_random_attention_calls_are_refused_by_name_or_equal_the_reference():
    rng = np.random.default_rng(2024)
    outcomes = [calls.check(calls.random_call(rng)) for _ in range(CALLS)]
    assert outcomes.count("refused") > 100 and outcomes.count("equal") > 500


def test_mutants_are_reproducible_and_differ():
    from selfattn.model import default_model_path

    from .fuzz.gguf_mutants import mutant, scan

    data = default_model_path().read_bytes()
    layout = scan(data)
    made = [mutant(data, layout, 1, i) for i in range(6)]
    assert made == [mutant(data, layout, 1, i) for i in range(6)]
    assert all(m[0] != data for m in made)
