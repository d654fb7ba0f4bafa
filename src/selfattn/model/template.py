"""Chat templates: Jinja code from the model file, rendered with bounds on what it may do.

A chat template is a stranger's program. jinja2's ImmutableSandboxedEnvironment keeps it away
from Python's internals; what the sandbox does not bound is work and memory: two nested
`range(99999)` loops run for hours, `{{ 'x' * 10**9 }}` or a doubling string takes gigabytes, a
recursive macro overflows the stack. So the template is parsed and rendered in a forked child,
with an address-space limit of MEMORY_BYTES above the parent's, a deadline of TIME_S and an
output of at most MAX_OUTPUT characters; the parent kills it past any of them. The environment
has no loader (include, import and extends are refused). Every failure is one ModelError line
naming the file and what went wrong. A render costs one fork, ~5-20 ms.
"""

import os
import select
import time

from ..errors import ModelError

TIME_S = 5.0
MEMORY_BYTES = 512 << 20
MAX_OUTPUT = 8 << 20  # characters; a chat prompt is far shorter than this


def render(source: str, path, **context) -> str:
    """source rendered with context (messages, add_generation_prompt, bos_token, ...)."""
    import jinja2.sandbox  # noqa: F401  (imported here, once, not in every child)

    if not hasattr(os, "fork"):
        return _render_here(source, context)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: render, send "0" + text or "1" + the problem, and leave
        code = 1
        try:
            os.close(read_end)
            _limit_memory()
            try:
                out, ok = _render_here(source, context), True
            except Exception as e:  # noqa: BLE001 - every failure becomes the parent's message
                out, ok = _describe(e), False
            data = (b"0" if ok else b"1") + out.encode("utf-8", "surrogatepass")
            view = memoryview(data)
            while view:
                view = view[os.write(write_end, view[:1 << 16]):]
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        data = _collect(read_end, pid, path)
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if not data:  # the child died before writing: killed by the memory limit or a signal
        how = (f"signal {-os.waitstatus_to_exitcode(status)}" if os.WIFSIGNALED(status)
               else f"exit status {os.waitstatus_to_exitcode(status)}")
        raise ModelError(f"{path}: the chat template failed: its renderer stopped ({how}); "
                         f"templates get {MEMORY_BYTES >> 20} MiB")
    text = data[1:].decode("utf-8", "surrogatepass")
    if data[:1] != b"0":
        raise ModelError(f"{path}: the chat template failed: {text}")
    return text


def _collect(fd, pid, path) -> bytes:
    """The child's bytes, until it closes its end; kill it past the deadline or the output cap."""
    chunks, size = [], 0
    deadline = time.monotonic() + TIME_S
    while True:
        left = deadline - time.monotonic()
        ready = select.select([fd], [], [], max(left, 0))[0] if left > 0 else []
        if not ready:
            _kill(pid)
            raise ModelError(f"{path}: the chat template ran past {TIME_S:g} s (a loop too "
                             "long?)")
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > 4 * MAX_OUTPUT + 1:  # UTF-8: at most 4 bytes a character
            _kill(pid)
            raise ModelError(f"{path}: the chat template's output passed {MAX_OUTPUT:,} "
                             "characters")


def _kill(pid):
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def _limit_memory():
    import resource

    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (size + MEMORY_BYTES, size + MEMORY_BYTES))


def _render_here(source: str, context: dict) -> str:
    from jinja2 import BaseLoader, TemplateNotFound
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class NoLoader(BaseLoader):
        def get_source(self, environment, template):
            raise TemplateNotFound(f"{template!r}: a chat template may not include, import or "
                                   "extend other templates")

    def raise_exception(message):
        raise TemplateError(f"it raised: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, loader=NoLoader())
    env.globals["raise_exception"] = raise_exception
    pieces, size = [], 0
    for piece in env.from_string(source).generate(**context):
        pieces.append(piece)
        size += len(piece)
        if size > MAX_OUTPUT:
            raise TemplateError(f"its output passed {MAX_OUTPUT:,} characters")
    return "".join(pieces)


def _describe(e: BaseException) -> str:
    from jinja2.exceptions import SecurityError, TemplateSyntaxError

    if isinstance(e, TemplateSyntaxError):
        what = f"syntax error on line {e.lineno}: {e.message}"
    elif isinstance(e, SecurityError):
        what = f"the sandbox refused: {e}"
    elif isinstance(e, RecursionError):
        what = "recursion too deep (a macro calling itself?)"
    elif isinstance(e, MemoryError):
        what = f"it needs more than the {MEMORY_BYTES >> 20} MiB templates get"
    elif type(e).__name__ == "TemplateError":  # raise_exception, the output cap
        what = str(e)
    else:
        what = f"{type(e).__name__}: {e}"
    return " ".join(what.split())
