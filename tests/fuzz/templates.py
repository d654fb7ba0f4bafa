"""Hostile chat templates: each must render to a bounded string or fail as one ModelError line
naming the file, within the renderer's time limit (model/template.py)."""

import itertools

PATH = "hostile.gguf"

HAND_WRITTEN = {
    "include a file": "{% include '/etc/passwd' %}",
    "import a module": "{% import 'os' as os %}{{ os }}",
    "from-import": "{% from 'os' import system %}{{ system('id') }}",
    "extends": "{% extends 'base' %}",
    "range 10**9": "{% for i in range(10**9) %}{% endfor %}",
    "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "mutual recursion": "{% macro a(n) %}{{ b(n) }}{% endmacro %}{% macro b(n) %}{{ a(n) }}"
                        "{% endmacro %}{{ a(0) }}",
    "recursive loop": "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}",
    "caller recursion": "{% macro m() %}{{ caller() }}{% endmacro %}"
                        "{% macro r() %}{% call m() %}{{ r() }}{% endcall %}{% endmacro %}{{ r() }}",
    "nested range(99999)": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}"
                           "{% endfor %}",
    "x * 10**9": "{{ 'x' * 1000000000 }}",
    "list * 10**9": "{{ ([0] * 1000000000)|length }}",
    "doubling string": "{% set ns = namespace(s='x') %}{% for i in range(40) %}"
                       "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "output bomb": "{% for i in range(99999) %}{{ 'y' * 1000 }}{% endfor %}",
    "center 10**9": "{{ 'x'|center(1000000000) }}",
    "format width": "{{ '%*s'|format(1000000000, 'x') }}",
    "str.format width": "{{ '{:>1000000000}'.format('x') }}",
    "indent bomb": "{{ ('x\n' * 1000)|indent(1000000) }}",
    "replace amplifier": "{{ ('x' * 100000).replace('x', 'y' * 100000) }}",
    "lipsum": "{{ lipsum(1000000) }}",
    "raise_exception": "{{ raise_exception('Conversation roles must alternate') }}",
    "syntax error": "{% for %}",
    "unclosed block": "{% if messages %}",
    "undefined": "{{ foo.bar }}",
    "message past the end": "{{ messages[99].content }}",
    "none attribute": "{{ none.x }}",
    "append": "{% set l = [] %}{{ l.append(1) }}",
    "dict update": "{% set d = {} %}{{ d.update({'a': 1}) }}",
    "mro walk": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals": "{{ raise_exception.__globals__ }}",
    "self": "{{ self._TemplateReference__context }}",
    "cycler": "{{ cycler.__init__.__globals__ }}",
    "namespace": "{{ namespace.__init__.__globals__ }}",
    "big int": "{{ 10 ** 10 ** 10 }}",
    "huge pow": "{{ 2 ** 100000000 }}",
    "deep expression": "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
    "deep nesting": "{% if 1 %}" * 3000 + "x" + "{% endif %}" * 3000,
    "a real template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                       "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
                       "assistant\n{% endif %}",
}

# hand-written cases that render, harmlessly: jinja's undefined for what the sandbox hides or
# what does not exist (an empty string), a power jinja bounds itself, a real template
HARMLESS = {"none attribute", "self", "globals", "big int", "deep nesting", "a real template"}

OBJECTS = ["''", "[]", "{}", "messages", "messages[0]", "namespace()", "cycler(1)", "joiner()",
           "range(3)", "lipsum", "raise_exception", "loop", "self", "bos_token"]
ATTRS = ["__class__", "__globals__", "__init__", "__subclasses__", "mro", "__dict__",
         "__builtins__", "gi_frame", "func_globals", "__reduce__", "format_map", "pop",
         "clear", "__code__", "_TemplateReference__context", "__self__"]


def cases() -> dict[str, str]:
    """The hand-written cases, then generated ones: attribute probes on every object, loops of
    growing sizes, repeated strings, recursion depths and undefined names."""
    out = dict(HAND_WRITTEN)
    for obj, attr in itertools.product(OBJECTS, ATTRS):
        out[f"probe {obj}.{attr}"] = f"{{{{ {obj}.{attr} }}}}"
    for a, b in itertools.product([10, 1000, 99999], repeat=2):
        out[f"loops {a} x {b}"] = (f"{{% for i in range({a}) %}}{{% for j in range({b}) %}}"
                                   "{% endfor %}{% endfor %}x")
    for k in (3, 6, 7, 8, 9):
        out[f"'ab' * 10**{k}"] = f"{{{{ 'ab' * {10 ** k} }}}}"
        out[f"join range 10**{k}"] = f"{{{{ range({min(10 ** k, 99999)})|join(',') * {k} }}}}"
    for depth in (10, 100, 900, 5000):
        out[f"macro depth {depth}"] = ("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{% endif %}"
                                       f"{{% endmacro %}}{{{{ f({depth}) }}}}")
    for name in ("os", "sys", "__import__", "eval", "exec", "open", "getattr", "globals"):
        out[f"call {name}"] = f"{{{{ {name}('x') }}}}"
    return out


def check(name: str, source: str, render) -> str:
    """'rendered' or 'refused'; raises AssertionError for anything else."""
    from selfattn.errors import ModelError

    try:
        text = render(source, PATH, messages=[{"role": "user", "content": "hi"}],
                      add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    except ModelError as e:
        message = str(e)
        assert message.startswith(f"{PATH}: ") and "\n" not in message, (name, message)
        return "refused"
    assert isinstance(text, str), name
    return "rendered"
