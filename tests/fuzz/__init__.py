"""Hostile input, generated: damaged GGUF files (gguf_mutants.py, run.py), chat templates
(templates.py) and attention calls (calls.py). tests/test_fuzz.py runs a fixed slice of each;
`python -m tests.fuzz.run --count N` the long runs docs/robustness.md reports."""
