"""The OpenAI-compatible HTTP API over an Engine (Starlette; served by uvicorn).

POST /v1/chat/completions and /v1/completions, streamed (SSE) or not; GET /v1/models, /health,
/metrics (Prometheus text), and / (a chat page: page.py). Every bad request gets a 4xx in OpenAI's error format
({"error": {"message", "type", "param", "code"}}); the body is read up to MAX_BODY bytes. The
chat template (a stranger's code, rendered bounded: model/template.py) and the tokenizer run on
a thread of their own, so the event loop never waits on them or on the model.
"""

import asyncio
import json
import time
import uuid

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import ModelError
from ..model import Sampler
from .engine import QueueFull, Request
from .metrics import Metrics
from .page import PAGE

MAX_BODY = 16 << 20  # bytes of one request body
MAX_STOPS = 4  # OpenAI's limit
ROLES = ("system", "developer", "user", "assistant", "tool")


class BadRequest(Exception):
    def __init__(self, message, param=None, status=400, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def response(self):
        return error_response(self.status, self.message, self.param, self.code, self.kind)


def error_response(status, message, param=None, code=None, kind="invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": code}}, status_code=status)


# -- reading a request ---------------------------------------------------------------------------

def _get(body, name, types, default=None, check=None, what=None):
    """body[name] if present and not null, of one of `types` (bool is not a number here), else
    default; check(value) -> True or BadRequest."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = what or " or ".join({int: "an integer", float: "a number", str: "a string",
                                     bool: "a boolean", list: "an array", dict: "an object"}[t]
                                    for t in types)
        raise BadRequest(f"'{name}' must be {names}, got {json.dumps(value)[:60]}", name)
    if check is not None and not check(value):
        raise BadRequest(f"'{name}' is out of range: {json.dumps(value)[:60]}", name)
    return value


def sampling(body, ctx: int, n_prompt: int) -> tuple:
    """-> (Sampler, max_tokens, stop strings) from OpenAI's sampling fields."""
    temperature = _get(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2)
    top_p = _get(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1)
    top_k = _get(body, "top_k", (int,), 0, lambda v: v >= 0)
    seed = _get(body, "seed", (int,), None)
    n = _get(body, "n", (int,), 1)
    if n != 1:
        raise BadRequest("only n = 1 is served", "n")
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest(f"'stop' must be a non-empty string or up to {MAX_STOPS} of them", "stop")
    room = ctx - n_prompt
    max_tokens = _get(body, "max_completion_tokens", (int,), None, lambda v: v >= 1)
    max_tokens = _get(body, "max_tokens", (int,), max_tokens, lambda v: v >= 1)
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise BadRequest(f"max_tokens {max_tokens} plus the prompt's {n_prompt} tokens pass the "
                         f"context of {ctx}", "max_tokens", code="context_length_exceeded")
    return Sampler(temperature=float(temperature), top_k=top_k, top_p=float(top_p),
                   seed=seed), max_tokens, tuple(stop)


def chat_messages(body) -> list:
    messages = _get(body, "messages", (list,), None)
    if not messages:
        raise BadRequest("'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}] must be an object with a role in {', '.join(ROLES)}",
                             "messages")
        content = m.get("content")
        if isinstance(content, list):  # parts: only text is served
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" \
                        or not isinstance(part.get("text"), str):
                    raise BadRequest(f"messages[{i}]: only text content parts are served",
                                     "messages")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None and m["role"] == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or text parts", "messages")
        out.append({"role": m["role"], "content": content})
    return out


async def read_json(request) -> dict:
    size, chunks = 0, []
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise BadRequest(f"the request body passes {MAX_BODY >> 20} MiB", status=413)
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest("the client left before sending the body") from None
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"the body is not valid JSON: {str(e)[:100]}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


# -- the app --------------------------------------------------------------------------------------

def make_app(engine, model_id: str, model_path: str = "") -> Starlette:
    metrics = Metrics(engine)
    engine.on_finish = metrics.finished
    tok, ctx = engine.tok, engine.ctx
    created = int(time.time())

    def check_model(body):
        name = _get(body, "model", (str,), None)
        if name is not None and name not in (model_id, "default"):
            raise BadRequest(f"the model '{name[:80]}' is not served here; this server has "
                             f"'{model_id}'", "model", status=404, code="model_not_found")

    def chat_ids(messages):
        try:
            return tok.encode(tok.render_chat(messages))
        except ModelError as e:
            raise BadRequest(str(e), "messages") from None

    def text_ids(prompt):
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return tok.encode(prompt)
        if isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = engine.model.args.vocab_size
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise BadRequest(f"token ids must be in 0 .. {vocab - 1}", "prompt")
            return list(prompt)
        raise BadRequest("'prompt' must be a string, one string in an array, or token ids",
                         "prompt")

    async def complete(request, chat: bool):
        endpoint = "chat" if chat else "completions"
        try:
            body = await read_json(request)
            check_model(body)
            stream = _get(body, "stream", (bool,), False)
            options = _get(body, "stream_options", (dict,), {})
            include_usage = options.get("include_usage") is True
            sampling(body, ctx, 1)  # the fields' types and ranges, before any tokenizing
            if chat:
                messages = chat_messages(body)
                ids = await run_in_threadpool(chat_ids, messages)
            else:
                if body.get("echo") is True or body.get("suffix") is not None:
                    raise BadRequest("'echo' and 'suffix' are not served", "echo")
                ids = await run_in_threadpool(text_ids, body.get("prompt"))
            if not ids:
                raise BadRequest("the prompt is empty", "prompt")
            if len(ids) >= ctx:
                raise BadRequest(f"the prompt is {len(ids)} tokens; the context is {ctx}",
                                 "messages" if chat else "prompt", code="context_length_exceeded")
            sampler, max_tokens, stop = sampling(body, ctx, len(ids))
        except BadRequest as e:
            metrics.request(endpoint, e.status)
            return e.response()
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        req = Request(ids, max_tokens, sampler,
                      lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait,
                                                                      (kind, payload)),
                      stop=stop, stream=stream)
        try:
            engine.submit(req)
        except QueueFull as e:
            metrics.request(endpoint, 503)
            return error_response(503, f"the server is busy: {e}", code="server_busy",
                                  kind="server_error")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        shape = Shape(chat, rid, model_id, created)
        if stream:
            metrics.request(endpoint, 200)
            return StreamingResponse(sse(events, req, shape, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        while True:
            try:
                kind, payload = await asyncio.wait_for(events.get(), 0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    req.cancel()
                    metrics.request(endpoint, 499)
                    return Response(status_code=499)
                continue
            if kind == "error":
                metrics.request(endpoint, 500)
                return error_response(500, payload, kind="server_error")
            elif kind == "done":
                metrics.request(endpoint, 200)
                return JSONResponse(shape.whole(payload))

    async def chat_completions(request):
        return await complete(request, True)

    async def completions(request):
        return await complete(request, False)

    async def models(request):
        return JSONResponse({"object": "list", "data": [{
            "id": model_id, "object": "model", "created": created, "owned_by": "selfattn",
            "meta": {"path": model_path, "n_ctx": ctx, "slots": len(engine.slots),
                     "kv_dtype": engine.slots[0].cache.kv_dtype}}]})

    async def health(request):
        return JSONResponse({"status": "ok", "slots_idle": len(engine.slots) - engine.busy,
                             "slots_busy": engine.busy, "queue": engine.waiting})

    async def prometheus(request):
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def page(request):
        return HTMLResponse(PAGE)

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", prometheus, methods=["GET"]),
              Route("/", page, methods=["GET"])]

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        return error_response(status, f"{request.method} {request.url.path}: "
                              f"{'no such route' if status == 404 else 'not allowed'}")

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


class Shape:
    """OpenAI's response objects for one request."""

    def __init__(self, chat, rid, model_id, created):
        self.chat, self.rid, self.model, self.created = chat, rid, model_id, created
        self.kind = "chat.completion" if chat else "text_completion"

    def head(self, kind):
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model}

    def usage(self, r):
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": r.cached_tokens}}

    def whole(self, r):
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": r.text},
                      "finish_reason": r.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": r.text, "finish_reason": r.finish_reason,
                      "logprobs": None}
        return {**self.head(self.kind), "choices": [choice], "usage": self.usage(r),
                "timings": r.timings()}

    def chunk(self, text=None, finish=None, role=False):
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else \
                ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return {**self.head(kind), "choices": [choice]}


def _event(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


async def sse(events, req, shape: Shape, include_usage: bool):
    """The stream's chunks; a client that leaves cancels the request (its slot frees at the next
    step). The last chunk carries the finish reason, usage and timings (and, with
    stream_options.include_usage, a chunk with empty choices carries the usage as OpenAI's does)."""
    done = False
    try:
        if shape.chat:
            yield _event(shape.chunk(role=True))
        while True:
            kind, payload = await events.get()
            if kind == "token":
                yield _event(shape.chunk(payload))
            elif kind == "error":
                yield _event({"error": {"message": payload, "type": "server_error",
                                        "param": None, "code": None}})
                break
            else:
                last = shape.chunk(finish=payload.finish_reason)
                last["usage"], last["timings"] = shape.usage(payload), payload.timings()
                yield _event(last)
                if include_usage:
                    tail = {**shape.head(last["object"]), "choices": [],
                            "usage": shape.usage(payload), "timings": payload.timings()}
                    yield _event(tail)
                break
        done = True
        yield b"data: [DONE]\n\n"
    finally:
        if not done:
            req.cancel()
