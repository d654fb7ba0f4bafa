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


def test_absurd_numbers_and_output_paths_are_refused_before_any_work(tmp_path):
    """Each in one line, exit 2, before the model is loaded (so quickly)."""
    cases = [
        (("plan", "--ctx", "999999999999999"), "past any model's context"),
        (("generate", "hi", "--temperature", "inf"), "finite number"),
        (("generate", "hi", "--top-p", "nan"), "finite number"),
        (("inspect", "hi", "--png", "/proc/version"), "ending in .png"),
        (("inspect", "hi", "--png", str(tmp_path)), "ending in .png"),
        (("inspect", "hi", "--png", str(tmp_path / "sub")), "ending in .png"),
        (("inspect", "hi", "--png", str(tmp_path / "none" / "x.png")), "folder does not exist"),
        (("inspect", "hi", "--html", str(tmp_path / "x.png")), "ending in .html"),
        (("bench", "--json", "/proc/selfattn.json"), "cannot be written"),
    ]
    (tmp_path / "dir.png").mkdir()
    cases.append((("inspect", "hi", "--png", str(tmp_path / "dir.png")), "is a folder"))
    for args, words in cases:
        r = run(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (args, r.stderr)
        assert words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    """`selfattn inspect ... --json - | head -c 10`: no error, no traceback. The JSON
    (attention weights of 3 layers x 9 heads over ~150 tokens) is far past a pipe's buffer."""
    p = subprocess.Popen([sys.executable, "-m", "selfattn.cli", "inspect", "word " * 150,
                          "--json", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(p.stdout.read(10)) == 10
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=600)
    assert "Traceback" not in err and "broken pipe" not in err.lower(), err
    assert "Exception" not in err and p.returncode == 1, (p.returncode, err)


def test_version():
    import selfattn

    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"selfattn {selfattn.__version__}"


def test_help_shows_defaults_and_plan_lists_the_catalogs():
    from selfattn.plan import hardware_entries, model_entries

    r = run("generate", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for words in ("tokens to generate at most (default: 128)", "(0: all) (default: 0)",
                  "sum to p (default: 1.0)", "--chat | --raw"):
        assert words in text, words
    r = run("plan", "--help")
    text = " ".join(r.stdout.split())
    assert all(e["name"] in text for e in model_entries() + hardware_entries())
