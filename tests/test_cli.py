"""The command line: real subprocesses, as a user runs them."""

import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "selfattn.cli", *args], capture_output=True,
                          text=True, timeout=600)


def test_demo_runs_and_shows_the_wall():
    r = run("demo", "--max-n", "512", "--reference-max-n", "512", "--heads", "2",
            "--kv-heads", "1")
    assert r.returncode == 0, r.stderr
    for word in ("reference", "flash", "256", "512", "peak"):
        assert word in r.stdout


def test_bad_arguments_are_one_line_on_stderr():
    r = run("demo", "--heads", "4", "--kv-heads", "3")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "multiple of --kv-heads" in r.stderr
    assert "Traceback" not in r.stderr
    r = run("demo", "--max-n", "zero")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "whole number" in r.stderr
    r = run("demo", "--max-n", "100")
    assert r.returncode == 2 and "at least 256" in r.stderr
