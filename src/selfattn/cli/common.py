"""What every command shares: one-line errors, argument types, the console, loading a model."""

import argparse
import os
import sys

from .. import formats


class CLIError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


class HelpWithDefaults(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it names it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and "default" not in text and not any(
                action.default is none for none in (None, False, argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other error, and
    the help shows each option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpWithDefaults)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def terminal(stderr=False):
    """rich's Console; wide enough for the tables when the output is a file or a pipe."""
    from rich.console import Console


    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 150)


def whole_number(text, low=1, high=None):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < low or (high is not None and n > high):
        raise argparse.ArgumentTypeError(f"expected a number >= {low}"
                                         + (f" and <= {high}" if high is not None else "")
                                         + f", got {n}")
    return n


def positive_int(text):
    return whole_number(text)


def nonneg_int(text):
    return whole_number(text, 0)


def port_number(text):
    return whole_number(text, 0, 65535)


MAX_CONTEXT = 1 << 24  # 16,777,216 positions: past any model's trained context


def context_size(text):
    n = positive_int(text)
    if n > MAX_CONTEXT:
        raise argparse.ArgumentTypeError(f"{n:,} positions is past any model's context "
                                         f"(at most {MAX_CONTEXT:,})")
    return n


def int_list(text):
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") \
            from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers >= 0, got {text!r}")
    return values


def nonneg_float(text):
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= x < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return x


def check_outputs(args, suffixes: dict):
    """Before any work: each output flag given (name -> allowed suffixes) names a file that can
    be written: its folder exists, it is not a folder or a special file, its suffix is one the
    writer produces ('-' means stdout where '-' is allowed), and opening it to append works (a
    file that was not there is removed again)."""
    for flag, allowed in suffixes.items():
        target = getattr(args, flag, None)
        if target is None or (target == "-" and "-" in allowed):
            continue
        where = f"--{flag} {target}"
        folder = os.path.dirname(os.path.abspath(target))
        if os.path.splitext(target)[1].lower() not in allowed:
            names = ", ".join(a for a in allowed if a != "-")
            raise CLIError(f"{where}: expected a file name ending in {names}")
        if not os.path.isdir(folder):
            raise CLIError(f"{where}: its folder does not exist")
        if os.path.isdir(target):
            raise CLIError(f"{where}: is a folder")
        if os.path.exists(target) and not os.path.isfile(target):
            raise CLIError(f"{where}: is not a regular file")
        existed = os.path.exists(target)
        try:  # the only sure test (root passes os.access where a mount is read-only)
            with open(target, "a"):
                pass
        except OSError as e:
            raise CLIError(f"{where}: cannot be written ({e.strerror})") from None
        if not existed:
            os.remove(target)


def gb(n):
    return f"{n / 1e9:,.2f} GB"


def store_path(kind):
    from ..measure.store import cache_dir
    return cache_dir() / f"{kind}.json"


def open_model_file(model_path):
    """-> (path, reader, seconds): --model (or the default model) opened once (its header and
    metadata read and checked, its tensors mapped), shared by every later step. ModelError on a
    bad file."""
    import time

    from ..model import default_model_path
    from ..model.gguf_file import open_gguf

    path = model_path or str(default_model_path())
    t = time.perf_counter()
    reader = open_gguf(path)
    return path, reader, time.perf_counter() - t


def load_model(model_path, kv_dtype="f32", opened=None):
    """-> (model, tokenizer, path, load_s), load_s counting the file's opening too; `opened` is
    open_model_file's result when the caller has it already."""
    import time

    from ..model import Transformer, Tokenizer

    path, reader, open_s = opened or open_model_file(model_path)
    t = time.perf_counter()
    model = Transformer.from_reader(reader, path, kv_dtype)
    tokenizer = Tokenizer.from_gguf(reader, path)
    return model, tokenizer, path, open_s + time.perf_counter() - t


def check_system(args):
    raw = getattr(args, "raw", None)  # generate has --raw and chats by default; inspect does not
    if args.system and (raw or (raw is None and not args.chat)):
        raise CLIError("--system is part of the chat template: "
                       + ("not with --raw" if raw else "add --chat"))


def chat_mode(tok, args) -> bool:
    """Whether the prompt goes through the chat template: --chat; for generate also by default
    when the file has one (as llama.cpp's conversation mode), unless --raw."""
    return bool(args.chat or (getattr(args, "raw", None) is False and tok.chat_template))


def prompt_ids(tok, args):
    """The prompt as token ids, wrapped in the chat template in chat mode (chat_mode)."""
    if args.system and not chat_mode(tok, args):
        raise CLIError("--system needs a chat template, and this file has none")
    if chat_mode(tok, args):
        messages = [{"role": "system", "content": args.system}] if args.system else []
        text = tok.render_chat(messages + [{"role": "user", "content": args.prompt}])
    else:
        text = args.prompt
    ids = tok.encode(text)
    if not ids:
        raise CLIError("the prompt is empty")
    return ids


def model_shape(model_arg, quant=None):
    """--model as a GGUF file (its own metadata and tensor sizes) or a catalog name."""
    from ..model import default_model_path
    from ..model.gguf_file import open_gguf
    from ..plan import ModelShape, find_model

    if model_arg is None:
        model_arg = str(default_model_path())
    if os.path.exists(model_arg) or model_arg.endswith(".gguf"):
        if quant:
            raise CLIError("--quant is for catalog models; a GGUF file has its own types")
        return ModelShape.from_gguf(open_gguf(model_arg), model_arg)
    return ModelShape.from_catalog(find_model(model_arg), quant or "Q4_K_M")


def cache_options(parser):
    parser.add_argument("--kv-dtype", choices=list(formats.KV_TYPES), default="f32",
                        help="KV cache type (q8_0, q4_0: ggml's blocks; default f32)")
    parser.add_argument("--context-policy", metavar="POLICY",
                        help="full (default), window:W, or sink:S,window:W (StreamingLLM): "
                             "what is kept once the stream outgrows the cache")


def check_kv_dtype(kv_dtype: str, head_dim: int):
    """The compact KV types' blocks of 32 must tile a head."""
    if kv_dtype in ("q8_0", "q4_0") and head_dim % 32:
        raise CLIError(f"--kv-dtype {kv_dtype} needs a head dim that is a multiple of 32; "
                       f"this model's is {head_dim}")


def guard_memory(args, opened):
    """-> (policy, ctx). Reads the file's shape only (opened: open_model_file's result); refuses,
    before the weights or the cache are allocated, what this machine's free memory cannot hold."""
    from ..cache import available_memory, parse_policy
    from ..plan import ModelShape
    from ..plan.predict import memory_guard

    path, reader, _ = opened
    shape = ModelShape.from_gguf(reader, path)
    every_layer = shape.sliding_window and shape.sliding_layers == shape.n_layers
    text = args.context_policy or (f"window:{shape.sliding_window}" if every_layer else "full")
    policy = parse_policy(text)
    check_kv_dtype(args.kv_dtype, shape.head_dim)
    ctx = args.ctx or shape.context
    positions = ctx if policy.kind == "full" else policy.sinks + policy.window + 512
    available = available_memory()
    if available is not None:
        memory_guard(shape, positions, args.kv_dtype, available)
    return policy, ctx
