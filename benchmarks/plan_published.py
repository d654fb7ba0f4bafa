"""`selfattn plan` on catalog hardware against published llama-bench results.

    python benchmarks/plan_published.py [--json out.json]

Every entry of selfattn/plan/data/validation.json (llama.cpp, full offload, with its source):
published pp512 and tg128 against plan's prediction with its device class's efficiencies
fitted on every result (in-sample) and fitted without that device's results (leave one device
out: the error a device new to the catalog can expect). Summary: median and worst absolute
leave-one-out error over the devices whose class has other devices to fit on. tg is tg128, or
tg512 where the source ran -n 512 (predicted at the mean depth, 256).
"""

import argparse
import json
import statistics

from rich.console import Console
from rich.table import Table

from selfattn.plan.published import CLASSES, fit, leave_one_out, results, tg_of, unit_speeds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    points = results()
    whole = fit(points)
    rows = leave_one_out(points)
    table = Table(title="selfattn plan vs published llama-bench: in-sample / leave-one-device-out")
    for col in ("hardware", "class", "model", "pp512", "in-sample", "left out", "tg",
                "in-sample", "left out", "source"):
        table.add_column(col, justify="right")
    err = lambda p, m: None if p is None else p / m - 1  # noqa: E731
    fmt = lambda e: "-" if e is None else f"{e:+.0%}"  # noqa: E731
    for r in rows:
        pp1, tg1 = unit_speeds(r)
        f = whole[r["cls"]]
        r.update(pp512_in=pp1 * f["prefill"], tg_in=tg_of(tg1, f))
        table.add_row(r["hardware"], r["cls"], f"{r['model']} {r['quant']}", f"{r['pp512']:.0f}",
                      fmt(err(r["pp512_in"], r["pp512"])), fmt(err(r["pp512_loo"], r["pp512"])),
                      f"{r['tg']:.1f} {r['tg_test']}", fmt(err(r["tg_in"], r["tg"])),
                      fmt(err(r["tg_loo"], r["tg"])), r["source"].split(" ")[0])
    console = Console(width=230)
    console.print(table)
    for cls, f in whole.items():
        console.print(f"{CLASSES[cls]}: prefill {f['prefill']:.2f} of peak FLOP/s, decode "
                      f"{f['decode']:.2f} of bandwidth + {1e3 * f['t_token']:.2f} ms a token, "
                      f"from {len(f['devices'])} devices")
    summary = {}
    for test in ("pp512", "tg"):
        e = [abs(r[f"{test}_loo"] / r[test] - 1) for r in rows if r[f"{test}_loo"] is not None]
        summary[test] = dict(n=len(e), median=statistics.median(e) if e else None,
                             worst=max(e) if e else None)
        if e:
            console.print(f"{test} left out: {len(e)} results, median |error| "
                          f"{statistics.median(e):.0%}, worst {max(e):.0%}")
    devices = {r["hardware"] for r in rows}
    console.print(f"{len(devices)} devices, {len({r['cls'] for r in rows})} classes, "
                  f"{len(rows)} results")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(fit=whole, rows=rows, summary=summary), fh, indent=1)


if __name__ == "__main__":
    main()
