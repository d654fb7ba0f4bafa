"""The HTML page: one self-contained file (no network, no external scripts or fonts).

The record travels inside the page as JSON, each head's matrix as base64 little-endian float32,
so the weight shown under the pointer is the recorded number itself. A layer and a head selector
pick the matrix; the canvas draws it (square-root colour scale, as the PNG); hovering a cell, or a
token of the prompt, shows that token's row: what it attends to, with the weights.
"""

import base64
import json

import numpy as np

from .record import AttentionRecord
from .stats import HeadStats


def page_data(record: AttentionRecord, stats: list[HeadStats], title: str) -> dict:
    by_key = {(s.layer, s.head): s for s in stats}
    mats = {}
    for a, layer in enumerate(record.layers):
        for b, head in enumerate(record.heads):
            raw = np.ascontiguousarray(record.weights[a, b], "<f4").tobytes()
            s = by_key[(layer, head)]
            mats[f"{layer},{head}"] = {
                "w": base64.b64encode(raw).decode("ascii"),
                "stats": {k: getattr(s, k) for k in ("sink_mass", "prev_mass", "self_mass",
                                                     "lookback", "entropy_bits", "kind")}}
    return {"title": title, "tokens": record.tokens, "layers": record.layers,
            "heads": record.heads, "n": len(record.token_ids), "matrices": mats}


def render_html(record: AttentionRecord, stats: list[HeadStats], title: str) -> str:
    data = json.dumps(page_data(record, stats, title))
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return _TEMPLATE.replace("__DATA__", data).replace("__TITLE__", _escape(title))


def write_html(record: AttentionRecord, stats: list[HeadStats], path, title: str = ""):
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(record, stats, title or "attention weights"))


def _escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<link rel="icon" href="data:,">
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.2em; color: #222; background: #fafafa; }
  h1 { font-size: 1.2em; margin: 0 0 .6em; }
  #controls { display: flex; gap: 1.2em; align-items: center; flex-wrap: wrap; margin-bottom: .6em; }
  #stats { color: #555; }
  #main { display: flex; gap: 1.5em; align-items: flex-start; flex-wrap: wrap; }
  #heatmap { image-rendering: pixelated; border: 1px solid #999; cursor: crosshair;
             width: 560px; height: 560px; }
  #side { max-width: 640px; }
  #readout { font-family: ui-monospace, monospace; min-height: 1.4em; margin-bottom: .5em; }
  .tok { display: inline-block; margin: 1px; padding: 0 2px; border-radius: 3px;
         font-family: ui-monospace, monospace; white-space: pre; cursor: default; }
  .tok.cur { outline: 2px solid #d33; }
  #row .tok { color: #000; }
  #tokens .tok { background: #e8e8e8; }
  table { border-collapse: collapse; margin-top: .4em; }
  td { padding: 0 .6em 0 0; font-family: ui-monospace, monospace; }
</style>
</head>
<body>
<h1>__TITLE__</h1>
<div id="controls">
  <label>layer <select id="layer"></select></label>
  <label>head <select id="head"></select></label>
  <span id="stats"></span>
</div>
<div id="main">
  <canvas id="heatmap" width="1" height="1"></canvas>
  <div id="side">
    <div id="readout">hover the matrix or a token</div>
    <div><b>row</b> (what the token attends to, shaded by weight):</div>
    <div id="row"></div>
    <table id="top"></table>
    <div style="margin-top:1em"><b>prompt tokens</b> (hover one to see its row):</div>
    <div id="tokens"></div>
  </div>
</div>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("data").textContent);
  const n = data.n, tokens = data.tokens;
  const layerSel = document.getElementById("layer"), headSel = document.getElementById("head");
  const canvas = document.getElementById("heatmap"), ctx = canvas.getContext("2d");
  const readout = document.getElementById("readout");
  const show = t => t.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  // viridis, 9 stops, interpolated
  const STOPS = [[68,1,84],[71,44,122],[59,81,139],[44,113,142],[33,144,141],
                 [39,173,129],[92,200,99],[170,220,50],[253,231,37]];
  function colour(w) {
    const x = Math.sqrt(Math.min(1, Math.max(0, w))) * (STOPS.length - 1);
    const i = Math.min(STOPS.length - 2, Math.floor(x)), f = x - i;
    return STOPS[i].map((c, k) => Math.round(c + f * (STOPS[i + 1][k] - c)));
  }
  function decode(b64) {
    const bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Float32Array(bytes.buffer);
  }
  const cache = {};
  function matrix() {
    const key = layerSel.value + "," + headSel.value;
    if (!(key in cache)) cache[key] = decode(data.matrices[key].w);
    return cache[key];
  }
  for (const l of data.layers) layerSel.add(new Option(String(l), String(l)));
  for (const h of data.heads) headSel.add(new Option(String(h), String(h)));

  function tokenSpan(i) {
    const s = document.createElement("span");
    s.className = "tok";
    s.textContent = show(tokens[i]);
    s.dataset.i = String(i);
    return s;
  }
  const tokBox = document.getElementById("tokens");
  for (let i = 0; i < n; i++) {
    const s = tokenSpan(i);
    s.addEventListener("mouseenter", () => showRow(i, null));
    tokBox.appendChild(s);
  }

  function draw() {
    const w = matrix();
    canvas.width = n; canvas.height = n;
    const img = ctx.createImageData(n, n);
    for (let k = 0; k < n * n; k++) {
      const c = colour(w[k]);
      img.data[4 * k] = c[0]; img.data[4 * k + 1] = c[1]; img.data[4 * k + 2] = c[2];
      img.data[4 * k + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    const s = data.matrices[layerSel.value + "," + headSel.value].stats;
    document.getElementById("stats").textContent =
      "sink " + s.sink_mass.toFixed(3) + " \u00b7 previous " + s.prev_mass.toFixed(3) +
      " \u00b7 self " + s.self_mass.toFixed(3) + " \u00b7 looks back " + s.lookback.toFixed(2) +
      " tokens \u00b7 entropy " + s.entropy_bits.toFixed(2) + " bit \u00b7 " + s.kind;
    document.body.dataset.drawn = layerSel.value + "," + headSel.value;
  }

  function showRow(i, j) {
    const w = matrix();
    const row = document.getElementById("row");
    row.replaceChildren();
    for (let k = 0; k < n; k++) {
      const s = tokenSpan(k), x = w[i * n + k], c = colour(x);
      s.style.background = "rgba(" + c[0] + "," + c[1] + "," + c[2] + "," + (0.15 + 0.85 * Math.sqrt(x)) + ")";
      s.title = x.toFixed(4);
      if (k === i) s.classList.add("cur");
      row.appendChild(s);
    }
    const order = [];
    for (let k = 0; k <= i; k++) order.push(k);
    order.sort((a, b) => w[i * n + b] - w[i * n + a]);
    const top = document.getElementById("top");
    top.replaceChildren();
    for (const k of order.slice(0, 8)) {
      const tr = top.insertRow();
      tr.insertCell().textContent = w[i * n + k].toFixed(4);
      tr.insertCell().textContent = k + ": " + JSON.stringify(show(tokens[k]));
    }
    if (j === null) {
      readout.textContent = "token " + i + " " + JSON.stringify(show(tokens[i])) + " attends with its row below";
      delete readout.dataset.weight;
    } else {
      const x = w[i * n + j];
      readout.textContent = "row " + i + " " + JSON.stringify(show(tokens[i])) + " \u2192 column " + j +
        " " + JSON.stringify(show(tokens[j])) + ": " + x.toPrecision(6);
      readout.dataset.weight = String(x);
      readout.dataset.cell = i + "," + j;
    }
  }

  canvas.addEventListener("mousemove", ev => {
    const r = canvas.getBoundingClientRect();
    const j = Math.min(n - 1, Math.max(0, Math.floor((ev.clientX - r.left - canvas.clientLeft) / canvas.clientWidth * n)));
    const i = Math.min(n - 1, Math.max(0, Math.floor((ev.clientY - r.top - canvas.clientTop) / canvas.clientHeight * n)));
    showRow(i, j);
  });
  layerSel.addEventListener("change", draw);
  headSel.addEventListener("change", draw);
  draw();
  document.body.dataset.ready = "1";
})();
</script>
</body>
</html>
"""
