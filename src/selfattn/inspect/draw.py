"""The PNG: a grid of heatmaps, one row per layer and one column per head, with one colour bar.

Each panel is the (n, n) matrix of a head, query tokens down the side, key tokens along the top,
coloured on a square-root scale so that the small weights a head spreads over many tokens stay
visible beside a sink's large ones. Token labels are drawn while they can be read (n <= 40).
"""

import matplotlib

matplotlib.use("Agg")  # files only, no screen

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402

from .record import AttentionRecord  # noqa: E402
from .stats import HeadStats  # noqa: E402

DPI = 100
LABELS_UP_TO = 40  # tokens; past this the axes are numbered
MARGIN_W, MARGIN_H = 1.4, 1.0  # inches: colour bar on the right, suptitle on top


def short(text: str, width: int = 10) -> str:
    """A token as an axis label: whitespace made visible, long ones cut with an ellipsis."""
    text = text.replace("\n", "↵").replace("\t", "⇥").replace(" ", "·")
    return text if len(text) <= width else text[:width - 1] + "…"


def panel_inches(n_tokens: int, n_panels: int) -> float:
    if n_tokens <= LABELS_UP_TO:
        return 3.6 if n_tokens > 16 else 2.8
    return 2.0 if n_panels > 64 else 2.6


def figure_inches(n_tokens: int, n_layers: int, n_heads: int) -> tuple[float, float]:
    """Width and height of the figure; the PNG is these times DPI pixels."""
    side = panel_inches(n_tokens, n_layers * n_heads)
    below = 0.75 if n_tokens <= LABELS_UP_TO else 0.45  # tick labels and the statistics line
    return n_heads * side + MARGIN_W, n_layers * (side + below) + MARGIN_H


def draw_png(record: AttentionRecord, stats: list[HeadStats], path, title: str = ""):
    """Write the grid to path; stats in the order (layer, head) of the record."""
    n = len(record.token_ids)
    L, H = len(record.layers), len(record.heads)
    w_in, h_in = figure_inches(n, L, H)
    fig = plt.figure(figsize=(w_in, h_in), dpi=DPI)
    grid = fig.add_gridspec(L, H, left=0.9 / w_in, right=1 - (MARGIN_W - 0.2) / w_in,
                            top=1 - (MARGIN_H - 0.2) / h_in, bottom=0.55 / h_in,
                            wspace=0.45, hspace=0.55 if n <= LABELS_UP_TO else 0.3)
    labels = [short(t) for t in record.tokens] if n <= LABELS_UP_TO else None
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    image = None
    by_key = {(s.layer, s.head): s for s in stats}
    for a, layer in enumerate(record.layers):
        for b, head in enumerate(record.heads):
            ax = fig.add_subplot(grid[a, b])
            image = ax.imshow(record.weights[a, b], cmap="viridis", norm=norm,
                              interpolation="nearest", aspect="auto")
            ax.set_title(f"layer {layer} · head {head}", fontsize=9, pad=3)
            s = by_key.get((layer, head))
            if s is not None:
                ax.set_xlabel(f"sink {s.sink_mass:.2f} · prev {s.prev_mass:.2f} · "
                              f"back {s.lookback:.1f} · H {s.entropy_bits:.1f} bit", fontsize=7)
            if labels is not None:
                ax.set_xticks(range(n), labels, rotation=90, fontsize=5)
                ax.set_yticks(range(n), labels, fontsize=5)
            else:
                ax.tick_params(labelsize=6)
    bar = fig.add_axes([1 - (MARGIN_W - 0.35) / w_in, 0.55 / h_in, 0.18 / w_in,
                        1 - (MARGIN_H + 0.35) / h_in])
    fig.colorbar(image, cax=bar, label="attention weight (square-root scale)")
    fig.suptitle(title or f"attention weights, {n} tokens", fontsize=11)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
