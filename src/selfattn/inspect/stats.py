"""What one head does, in a few numbers computed from its (n, n) attention matrix.

Row 0 can only look at itself, so the averages below are over rows 1 .. n-1 (all rows if n = 1):
- sink_mass: the weight on token 0, the "attention sink" StreamingLLM keeps in its cache;
- prev_mass, self_mass: the weight on the previous token (j = i-1) and on the token itself;
- lookback: the mean distance looked back, Σ_j w_ij (i - j);
- entropy_bits: each row's entropy in bits (0: all weight on one token; log2(i+1): uniform);
- kind: "sink", "previous" or "self" when that mass is above one half, else "mixed".
"""

from dataclasses import dataclass, field

import numpy as np


@dataclass
class HeadStats:
    layer: int
    head: int
    sink_mass: float
    prev_mass: float
    self_mass: float
    lookback: float
    entropy_bits: float  # mean over the rows used
    kind: str
    row_entropy_bits: list = field(default_factory=list)  # every row, 0 .. n-1


def head_stats(w: np.ndarray, layer: int, head: int) -> HeadStats:
    """w (n, n): rows of attention weights."""
    w = np.asarray(w, np.float64)
    n = w.shape[0]
    i = np.arange(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        row_entropy = -np.where(w > 0, w * np.log2(w), 0.0).sum(axis=1)
    rows = slice(1, n) if n > 1 else slice(0, n)
    prev = np.where(i > 0, w[i, np.maximum(i - 1, 0)], 0.0)
    masses = {"sink": float(w[rows, 0].mean()), "previous": float(prev[rows].mean()),
              "self": float(np.diagonal(w)[rows].mean())}
    best = max(masses, key=masses.get)
    lookback = (w * (i[:, None] - i[None, :])).sum(axis=1)
    return HeadStats(layer=layer, head=head, sink_mass=masses["sink"],
                     prev_mass=masses["previous"], self_mass=masses["self"],
                     lookback=float(lookback[rows].mean()),
                     entropy_bits=float(row_entropy[rows].mean()),
                     kind=best if masses[best] > 0.5 else "mixed",
                     row_entropy_bits=[float(x) for x in row_entropy])
