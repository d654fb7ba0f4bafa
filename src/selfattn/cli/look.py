"""`selfattn inspect`: the attention matrix of a prompt, per layer and head."""

import os
import sys

from .common import check_outputs, check_system, load_model, prompt_ids, terminal


def cmd_inspect(args):
    import json

    from rich.table import Table

    from ..inspect import head_stats, parse_selection, record_attention
    from ..inspect.record import check_size

    check_outputs(args, {"png": (".png",), "html": (".html", ".htm"), "json": (".json", "-")})
    check_system(args)
    model, tok, path, _ = load_model(args.model)
    a = model.args
    layers_text = args.layers or f"0,{a.n_layers // 2},{a.n_layers - 1}"
    layers = parse_selection(layers_text, a.n_layers, "--layers")
    heads = parse_selection(args.heads, a.n_heads, "--heads")
    ids = prompt_ids(tok, args)
    check_size(len(ids), len(layers), len(heads))
    record = record_attention(model, ids, tok.token_texts(ids), layers, heads)
    stats = [head_stats(record.weights[x, y], layer, head)
             for x, layer in enumerate(layers) for y, head in enumerate(heads)]
    name = os.path.basename(str(path))
    title = f"{name}: {len(ids)} tokens"
    console = terminal(stderr=args.json == "-")
    table = Table(title=f"attention per head ({title}); averages over rows 1..n-1")
    for col in ("layer", "head", "sink (token 0)", "previous", "self", "looks back", "entropy bit",
                "kind"):
        table.add_column(col, justify="right")
    for s in stats:
        table.add_row(str(s.layer), str(s.head), f"{s.sink_mass:.3f}", f"{s.prev_mass:.3f}",
                      f"{s.self_mass:.3f}", f"{s.lookback:.2f}", f"{s.entropy_bits:.2f}", s.kind)
    console.print(table)
    sinks = sum(s.sink_mass > 0.5 for s in stats)
    console.print(f"{sinks} of {len(stats)} heads put more than half their weight on the first "
                  "token (the attention sink).")
    if args.png:
        from ..inspect.draw import draw_png
        draw_png(record, stats, args.png, title)
        console.print(f"wrote {args.png}")
    if args.html:
        from ..inspect.page import write_html
        write_html(record, stats, args.html, title)
        console.print(f"wrote {args.html}")
    if args.json:
        doc = {"model": str(path), "prompt": args.prompt, "token_ids": record.token_ids,
               "tokens": record.tokens, "layers": layers, "heads": heads,
               "weights": record.weights.tolist(),
               "stats": [s.__dict__ for s in stats]}
        if args.json == "-":
            json.dump(doc, sys.stdout)
            print()
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(doc, f)
            console.print(f"wrote {args.json}")
