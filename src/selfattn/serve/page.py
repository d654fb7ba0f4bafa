"""GET /: a self-contained chat page (no CDN, no external file). It streams each answer from
/v1/chat/completions and shows, under each reply, its TTFT, tokens/s, how many prompt tokens came
from cached K/V, and attention's share of the forward time, from the stream's `timings`."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>selfattn serve</title>
<link rel="icon" href="data:,">
<style>
 body { font: 15px/1.45 system-ui, sans-serif; margin: 0; background: #f6f6f4; color: #1d1d1b; }
 header { padding: 10px 16px; background: #24292e; color: #fff; }
 header small { color: #aab; margin-left: 8px; }
 #log { max-width: 860px; margin: 0 auto; padding: 12px 16px 140px; }
 .msg { margin: 10px 0; padding: 10px 12px; border-radius: 8px; white-space: pre-wrap; }
 .user { background: #dde8f7; margin-left: 80px; }
 .assistant { background: #fff; border: 1px solid #ddd; margin-right: 80px; }
 .stats { font-size: 12px; color: #667; margin: -4px 80px 12px 4px; }
 .error { background: #fde2e2; border: 1px solid #e99; }
 form { position: fixed; bottom: 0; left: 0; right: 0; background: #fff; border-top: 1px solid #ccc;
        padding: 10px 16px; display: flex; gap: 8px; justify-content: center; }
 textarea { flex: 1; max-width: 760px; height: 56px; font: inherit; padding: 6px; }
 button { padding: 0 18px; font: inherit; }
</style></head>
<body data-ready="0" data-busy="0" data-replies="0">
<header><b>selfattn serve</b><small id="model"></small>
<button id="reset" type="button" style="float:right">new chat</button></header>
<div id="log"></div>
<form id="form">
<textarea id="prompt" placeholder="Message (Enter sends, Shift+Enter: new line)"></textarea><button id="send" type="submit">Send</button></form>
<script>
"use strict";
const body = document.body, log = document.getElementById("log");
const promptBox = document.getElementById("prompt");
let messages = [], model = null;

function add(cls, text) {
  const div = document.createElement("div");
  div.className = "msg " + cls;
  div.textContent = text;
  log.appendChild(div);
  window.scrollTo(0, document.body.scrollHeight);
  return div;
}

function showStats(t) {
  const div = document.createElement("div");
  div.className = "stats";
  const tps = t.predicted_per_second || 0, share = 100 * (t.attention_share || 0);
  div.dataset.ttft = t.ttft_ms; div.dataset.tps = tps;
  div.dataset.cached = t.cache_n; div.dataset.attention = t.attention_share;
  div.textContent = "TTFT " + t.ttft_ms.toFixed(0) + " ms \\u00b7 " + tps.toFixed(1) +
    " tok/s \\u00b7 " + t.cache_n + " of " + (t.cache_n + t.prompt_n) +
    " prompt tokens reused \\u00b7 attention " + share.toFixed(0) + "% of forward time";
  log.appendChild(div);
}

async function send(text) {
  body.dataset.busy = "1";
  messages.push({role: "user", content: text});
  add("user", text);
  const out = add("assistant", "");
  let reply = "", timings = null;
  try {
    const r = await fetch("/v1/chat/completions", {method: "POST",
      headers: {"content-type": "application/json"},
      body: JSON.stringify({model: model, messages: messages, stream: true, temperature: 0})});
    if (!r.ok) throw new Error((await r.json()).error.message);
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\\n\\n")) >= 0) {
        const line = buf.slice(0, cut); buf = buf.slice(cut + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const ev = JSON.parse(line.slice(6));
        if (ev.error) throw new Error(ev.error.message);
        const c = ev.choices && ev.choices[0];
        if (c && c.delta && c.delta.content) { reply += c.delta.content; out.textContent = reply; }
        if (ev.timings) timings = ev.timings;
      }
    }
    messages.push({role: "assistant", content: reply});
    if (timings) showStats(timings);
  } catch (e) {
    out.classList.add("error");
    out.textContent = "error: " + e.message;
    messages.pop();
  }
  body.dataset.replies = String(log.querySelectorAll(".assistant").length);
  body.dataset.busy = "0";
}

document.getElementById("form").addEventListener("submit", ev => {
  ev.preventDefault();
  const text = promptBox.value.trim();
  if (!text || body.dataset.busy === "1") return;
  promptBox.value = "";
  send(text);
});
promptBox.addEventListener("keydown", ev => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    document.getElementById("form").requestSubmit();
  }
});
document.getElementById("reset").addEventListener("click", () => {
  messages = []; log.textContent = "";
});
fetch("/v1/models").then(r => r.json()).then(m => {
  model = m.data[0].id;
  document.getElementById("model").textContent = model + " \\u00b7 " + m.data[0].meta.n_ctx +
    " positions per slot";
  body.dataset.ready = "1";
});
</script></body></html>
"""
