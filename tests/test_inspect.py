"""`selfattn inspect`: the recorded weights, the statistics, the PNG, the HTML page in a real
headless browser, and the command line."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from selfattn.cache import KVCache
from selfattn.inspect import head_stats, parse_selection, record_attention
from selfattn.inspect.record import MAX_TOKENS, check_size
from selfattn.model import Transformer, Tokenizer
from selfattn.model.gguf_file import open_gguf

from .tiny_gguf import tiny_model_file


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, reader, _, _ = tiny_model_file(tmp_path_factory, 11, n_layers=3)
    return path, Transformer.from_reader(reader, path), Tokenizer.from_gguf(reader, path)


def plain_softmax_weights(q, k):
    """q (H, n, D), k (H_kv, n, D) float64 -> (H, n, n): softmax(q kᵀ / sqrt(D)), causal."""
    H, n, D = q.shape
    k = np.repeat(k, H // k.shape[0], axis=0)
    s = q @ k.transpose(0, 2, 1) / np.sqrt(D)
    s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_recorded_weights_equal_a_plain_float64_recomputation(tiny):
    _, model, tok = tiny
    ids = tok.encode("the cat in the hat sat on the mat")
    n = len(ids)
    seen = {}

    def grab(layer, q, k, kv_len, window):
        seen[layer] = (q[0].astype(np.float64), k[0, :, :kv_len].astype(np.float64))

    model.forward(np.asarray(ids), KVCache.for_model(model.args, n), 0, observe=grab)
    rec = record_attention(model, ids, tok.token_texts(ids), [0, 2], [1, 3])
    assert rec.weights.shape == (2, 2, n, n) and rec.weights.dtype == np.float32
    for a, layer in enumerate([0, 2]):
        expect = plain_softmax_weights(*seen[layer])[[1, 3]]
        np.testing.assert_allclose(rec.weights[a], expect, rtol=0, atol=2e-7)
    np.testing.assert_allclose(rec.weights.sum(-1), 1.0, atol=1e-6)
    assert np.all(np.triu(rec.weights, k=1) == 0)  # nothing above the diagonal, exactly
    assert rec.tokens == tok.token_texts(ids) and "".join(rec.tokens) == tok.decode(ids)


def test_statistics_on_matrices_whose_answer_is_known():
    n = 6
    i = np.arange(n)
    sink = np.zeros((n, n))
    sink[:, 0] = 1
    s = head_stats(sink, 3, 1)
    assert (s.kind, s.sink_mass, s.self_mass, s.layer, s.head) == ("sink", 1.0, 0.0, 3, 1)
    assert s.lookback == pytest.approx(i[1:].mean()) and s.entropy_bits == 0
    prev = np.zeros((n, n))
    prev[0, 0] = 1
    prev[i[1:], i[1:] - 1] = 1
    s = head_stats(prev, 0, 0)
    assert s.kind == "previous" and s.prev_mass == 1 and s.lookback == 1
    s = head_stats(np.eye(n), 0, 0)
    assert s.kind == "self" and s.self_mass == 1 and s.lookback == 0
    uniform = np.tril(np.ones((n, n))) / (i + 1)[:, None]
    s = head_stats(uniform, 0, 0)
    assert s.kind == "mixed"
    np.testing.assert_allclose(s.row_entropy_bits, np.log2(i + 1), atol=1e-12)
    assert s.lookback == pytest.approx((i[1:] / 2).mean())  # mean distance over 0..i is i/2
    assert s.sink_mass == pytest.approx((1 / (i[1:] + 1)).mean())


def test_selection_and_size_limits():
    assert parse_selection("all", 4, "--heads") == [0, 1, 2, 3]
    assert parse_selection("2,0,-1,2", 30, "--layers") == [0, 2, 29]
    with pytest.raises(ValueError, match=r"--layers: 30 is out of range, the model has 30"):
        parse_selection("0,30", 30, "--layers")
    with pytest.raises(ValueError, match="--heads: expected 'all'"):
        parse_selection("first", 9, "--heads")
    check_size(MAX_TOKENS, 1, 1)
    with pytest.raises(ValueError, match=f"inspect draws at most {MAX_TOKENS}"):
        check_size(MAX_TOKENS + 1, 1, 1)
    with pytest.raises(ValueError, match="choose fewer --layers or --heads"):
        check_size(2048, 30, 9)


@pytest.fixture(scope="module")
def drawn(tiny, tmp_path_factory):
    from selfattn.inspect.draw import draw_png
    from selfattn.inspect.page import write_html

    _, model, tok = tiny
    ids = tok.encode("the hat")
    rec = record_attention(model, ids, tok.token_texts(ids), [0, 1, 2], [0, 1, 2, 3])
    stats = [head_stats(rec.weights[a, b], layer, head)
             for a, layer in enumerate(rec.layers) for b, head in enumerate(rec.heads)]
    out = tmp_path_factory.mktemp("drawn")
    draw_png(rec, stats, out / "a.png", "tiny </script><b>")
    write_html(rec, stats, out / "a.html", "tiny </script><b>")
    return rec, out


def test_png_is_an_image_of_the_expected_size(drawn):
    from PIL import Image

    from selfattn.inspect.draw import DPI, figure_inches

    rec, out = drawn
    w_in, h_in = figure_inches(len(rec.token_ids), 3, 4)
    with Image.open(out / "a.png") as im:
        assert im.format == "PNG"
        assert im.size == (round(w_in * DPI), round(h_in * DPI))
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 10  # drawn, not blank


def test_html_is_self_contained(drawn):
    _, out = drawn
    page = (out / "a.html").read_text()
    for needle in ("http://", "https://", "<script src", "<link rel=\"stylesheet", "@import",
                   "url("):
        assert needle not in page
    # the title holds "</script>": escaped, the data block still ends where it should and parses
    data = page.split('id="data">')[1].split("</script>")[0]
    assert json.loads(data)["title"] == "tiny </script><b>"


def _browser(tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        msg = "Debian's chromium and chromium-driver are needed (.ci/run installs them)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-sync",
                 "--disable-component-update", f"--user-data-dir={tmp_path / 'profile'}",
                 "--window-size=1400,1000"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def test_html_page_works_in_a_headless_browser(drawn, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    rec, out = drawn
    n = len(rec.token_ids)
    browser = _browser(tmp_path)
    try:
        browser.get((out / "a.html").as_uri())
        body = browser.find_element(By.TAG_NAME, "body")
        assert body.get_attribute("data-ready") == "1"
        canvas = browser.find_element(By.ID, "heatmap")
        picture = lambda: browser.execute_script(  # noqa: E731
            "return document.getElementById('heatmap').toDataURL()")
        first = picture()
        assert body.get_attribute("data-drawn") == "0,0"
        Select(browser.find_element(By.ID, "layer")).select_by_visible_text("2")
        assert body.get_attribute("data-drawn") == "2,0" and picture() != first
        second = picture()
        Select(browser.find_element(By.ID, "head")).select_by_visible_text("3")
        assert body.get_attribute("data-drawn") == "2,3" and picture() != second

        # hover the centre of cell (row i, column j): offsets are from the element's centre
        size = canvas.size  # border box: 1px border on each side
        cell_w, cell_h = (size["width"] - 2) / n, (size["height"] - 2) / n
        for i, j in ((n - 1, 0), (n - 1, n - 2), (1, 1)):
            x = 1 + (j + 0.5) * cell_w - size["width"] / 2
            y = 1 + (i + 0.5) * cell_h - size["height"] / 2
            ActionChains(browser).move_to_element_with_offset(canvas, int(x), int(y)).perform()
            readout = browser.find_element(By.ID, "readout")
            assert readout.get_attribute("data-cell") == f"{i},{j}"
            assert float(readout.get_attribute("data-weight")) == pytest.approx(
                float(rec.weights[2, 3, i, j]), rel=1e-6)
            assert f"row {i}" in readout.text and f"column {j}" in readout.text
            row = browser.find_elements(By.CSS_SELECTOR, "#row .tok")
            assert len(row) == n and float(row[j].get_attribute("title")) == pytest.approx(
                float(rec.weights[2, 3, i, j]), abs=1e-4)
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert errors == []
    finally:
        browser.quit()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "selfattn.cli", "inspect", *args],
                          capture_output=True, text=True, timeout=600)


def test_cli_inspect_writes_json_png_html(tiny, tmp_path):
    path = tiny[0]
    r = run_cli("the cat sat", "--model", str(path), "--layers", "0,-1", "--heads", "1,2",
                "--json", str(tmp_path / "w.json"), "--png", str(tmp_path / "w.png"),
                "--html", str(tmp_path / "w.html"))
    assert r.returncode == 0, r.stderr
    assert "sink" in r.stdout and "looks back" in r.stdout
    doc = json.loads((tmp_path / "w.json").read_text())
    n = len(doc["token_ids"])
    assert doc["layers"] == [0, 2] and doc["heads"] == [1, 2]
    assert np.asarray(doc["weights"]).shape == (2, 2, n, n)
    assert [(s["layer"], s["head"]) for s in doc["stats"]] == [(0, 1), (0, 2), (2, 1), (2, 2)]
    assert len(doc["stats"][0]["row_entropy_bits"]) == n
    assert (tmp_path / "w.png").stat().st_size > 1000 and (tmp_path / "w.html").exists()


def test_cli_inspect_errors_are_one_line(tiny, tmp_path):
    path = str(tiny[0])
    for args, words in ((("x", "--model", path, "--layers", "7"), "out of range"),
                        (("x", "--model", path, "--heads", "a,b"), "expected 'all'"),
                        (("x", "--model", path, "--png", str(tmp_path / "no" / "a.png")),
                         "folder does not exist"),
                        (("a" * (MAX_TOKENS + 10), "--model", path), "at most")):
        r = run_cli(*args)
        assert r.returncode == 2, r.stderr
        assert words in r.stderr and "Traceback" not in r.stderr
        assert r.stderr.strip().count("\n") == 0


def test_default_model_heads_sink_into_the_first_token():
    """The known fact (Xiao et al. 2023): many heads put most of their weight on token 0."""
    from selfattn.model import default_model_path

    path = default_model_path()
    reader = open_gguf(path)
    model, tok = Transformer.from_reader(reader, path), Tokenizer.from_gguf(reader, path)
    ids = tok.encode("Attention lets every token of a sentence look at every other token. The "
                     "weights of each head say how much a token draws from each earlier token.")
    a = model.args
    rec = record_attention(model, ids, tok.token_texts(ids), list(range(a.n_layers)),
                           list(range(a.n_heads)))
    sink = np.array([[head_stats(rec.weights[x, y], 0, 0).sink_mass for y in range(a.n_heads)]
                     for x in range(a.n_layers)])
    n = len(ids)
    uniform = np.mean(1 / np.arange(2, n + 1))  # the sink mass of a head that spreads evenly
    assert (sink > 0.5).mean() > 0.4, (sink > 0.5).sum()
    assert np.median(sink) > 4 * uniform
    assert (sink[:2] > 0.5).sum() == 0  # the first layers look around, the sink forms later
