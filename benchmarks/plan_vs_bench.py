"""How honest is `selfattn plan --hardware this`? Calibrate on one bench run, predict another.

    python benchmarks/plan_vs_bench.py CALIBRATION.json CHECK.json [--model PATH]

Both files are `selfattn bench --json` outputs on the same model and machine, at different depths.
The efficiencies are fitted to the first (as `selfattn bench` does), the roofline is this machine's
stored one, and every TTFT, pp and tg test of the second is predicted and compared: the error of a
prediction made before the measurement it is checked against.
"""

import argparse
import json
import statistics
import sys

from rich.console import Console
from rich.table import Table

from selfattn.measure import bench
from selfattn.measure.roofline import load_or_measure
from selfattn.model import default_model_path
from selfattn.model.gguf_file import open_gguf
from selfattn.plan import ModelShape


def records(path):
    return [bench.Record(**{k: v for k, v in r.items() if k in bench.Record.__dataclass_fields__})
            for r in json.load(open(path))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("calibration")
    ap.add_argument("check")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    path = args.model or str(default_model_path())
    shape = ModelShape.from_gguf(open_gguf(path), path)
    roofline, _ = load_or_measure()
    cal = records(args.calibration)
    fit = bench.calibrate(cal, shape, roofline)
    refused = bench.refusals(cal, fit, shape, roofline)
    table = Table(title=f"plan --hardware this (calibrated on {args.calibration}) against "
                        f"{args.check}")
    for col in ("test", "measured", "predicted", "error", "judged"):
        table.add_column(col, justify="right")
    errors = []
    for r in records(args.check):
        pred_s = bench.predicted_seconds(r, fit, shape, roofline)  # what plan would say
        if r.n_gen:
            pred = r.n_gen / pred_s
            meas, unit, judged = statistics.median(r.samples_ts), "tok/s", r.n_depth >= 2048
        else:
            pred, meas, unit = pred_s, statistics.median(r.samples_ns) / 1e9, "s"
            judged = r.test.startswith("ttft") and r.n_prompt >= 1024
        err = pred / meas - 1
        if judged:
            errors.append(err)
        table.add_row(r.test, f"{meas:.3f} {unit}", f"{pred:.3f} {unit}", f"{err:+.1%}",
                      "yes" if judged else "")
    console = Console(width=120)
    console.print(table)
    console.print(f"efficiencies fitted: { {k: round(float(v), 3) for k, v in fit.items() if k.startswith('e_')} }")
    for reason in refused:  # what `selfattn bench` would have said of this calibration run
        console.print(f"bench would not keep this fit: {reason}")
    if errors:
        console.print(f"TTFT at prompts >= 1024 and tok/s at depths >= 2048: worst error "
                      f"{max(map(abs, errors)):.1%} over {len(errors)} tests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
