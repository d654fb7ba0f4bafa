"""The `selfattn` command. The library logs; this module owns the terminal.

Errors the user can fix (bad arguments, bad input) print one line on stderr and exit 2.
"""

import argparse
import logging
import sys


class CLIError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


def _positive_int(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {n}")
    return n


def cmd_demo(args):
    from rich.console import Console
    from rich.table import Table

    from .measure.wall import quadratic_wall

    if args.max_n < 256:
        raise CLIError(f"--max-n must be at least 256, got {args.max_n}")
    if args.heads % args.kv_heads:
        raise CLIError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    ns = []
    n = 256
    while n <= args.max_n:
        ns.append(n)
        n *= 2
    console = Console()
    console.print(f"[bold]The quadratic wall[/]: causal self-attention, H={args.heads} "
                  f"H_kv={args.kv_heads} D={args.dim}, float32. Reference (builds the n x n "
                  f"matrix, float64) against selfattn's flash path (never builds it).")
    table = Table()
    for col in ("n", "pairs", "impl", "ms (median)", "x prev n", "GFLOP/s", "peak extra MiB"):
        table.add_column(col, justify="right")
    prev = {}
    with console.status("measuring...") as status:
        for p in quadratic_wall(ns, heads=args.heads, kv_heads=args.kv_heads, dim=args.dim,
                                reference_max_n=args.reference_max_n):
            status.update(f"measured {p.impl} at n={p.n}")
            grow = f"{p.median_s / prev[p.impl]:.1f}x" if p.impl in prev else ""
            prev[p.impl] = p.median_s
            table.add_row(str(p.n), f"{p.pairs:,}", p.impl, f"{p.median_s * 1e3:.1f}", grow,
                          f"{p.gflops:.1f}", f"{p.peak_bytes / 2**20:.1f}")
    console.print(table)
    console.print("Doubling n multiplies the pairs, and so the time, by ~4: the quadratic wall. "
                  "The reference's memory grows by ~4 too; the flash path's stays flat.")


def build_parser():
    parser = argparse.ArgumentParser(prog="selfattn", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the quadratic wall: attention time and memory as n doubles")
    demo.add_argument("--max-n", type=_positive_int, default=8192, help="largest n (default 8192)")
    demo.add_argument("--reference-max-n", type=_positive_int, default=4096,
                      help="largest n for the reference, which needs n² memory (default 4096)")
    demo.add_argument("--heads", type=_positive_int, default=9, help="query heads (default 9)")
    demo.add_argument("--kv-heads", type=_positive_int, default=3, help="kv heads (default 3)")
    demo.add_argument("--dim", type=_positive_int, default=64, help="head dim (default 64)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        args.func(args)
    except (CLIError, ValueError, OSError) as e:
        print(f"selfattn {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("selfattn: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
