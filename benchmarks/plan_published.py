"""`selfattn plan` on catalog hardware against published llama-bench results.

    python benchmarks/plan_published.py

Every entry of selfattn/plan/data/validation.json (llama.cpp, full offload, with its source):
predicted pp512 (512 / TTFT(512)) and tg128 (tokens/s on an empty cache) against the published
figure. The engine efficiencies in efficiency.json were set from these same points, so the errors
are in-sample: they show how well one efficiency per kind of hardware fits, not a blind test.
"""

from rich.console import Console
from rich.table import Table

from selfattn.plan import ModelShape, find_hardware, find_model, plan
from selfattn.plan.catalog import load
from selfattn.plan.predict import catalog_device


def main():
    table = Table(title="selfattn plan vs published llama-bench (Llama-3.1-8B Q4_K_M)")
    for col in ("hardware", "pp512 published", "predicted", "error", "tg128 published",
                "predicted", "error", "source"):
        table.add_column(col, justify="right")
    for r in load("validation.json")["results"]:
        shape = ModelShape.from_catalog(find_model(r["model"]), r["quant"])
        p = plan(shape, catalog_device(find_hardware(r["hardware"])), 512, "f16")
        pp, tg = 512 / p.ttft_s, p.decode_tps_empty
        table.add_row(r["hardware"], f"{r['pp512']:.0f}", f"{pp:.0f}", f"{pp / r['pp512'] - 1:+.0%}",
                      f"{r['tg128']:.1f}", f"{tg:.1f}", f"{tg / r['tg128'] - 1:+.0%}",
                      r["source"].split(" ")[0])
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
