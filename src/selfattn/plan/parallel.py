"""Context parallelism on N nodes: what ring prefill and sharded decode would give.

Each node holds c = n/N of the prompt (two zigzag chunks) and the whole model. Per layer the
ring takes N-1 steps; in each, a node sends the K and V block it holds on:

    bytes per step = 2 · c · H_kv · row_bytes(D)         (row_bytes: D values in the KV type)

and meanwhile scores its queries against the block in hand: under the causal mask, two of the
four chunk pairs are visible, c²/2 pairs per head, so

    FLOPs per step = 4 · D · H · c² / 2.

A transfer is hidden when FLOPs per step / F >= bytes per step / B (F: the node's attention
FLOP/s, peak · e_attention; B: the link's bytes/s), i.e. for chunks of at least

    c_min = F · H_kv · row_bytes(D) / (D · H · B)

tokens per node (Ring Attention's c >= F/B, with this model's heads and KV type). TTFT on N nodes
= the node's share of the matmuls and attention + what no compute covers of each step's transfer.
Decode with a sharded cache: every node reads all the weights and 1/N of the KV, then the
(out, lse) pairs are gathered: one link latency and N·H·(D+1)·4 bytes per layer.
"""

from dataclasses import asdict, dataclass

from .. import formats
from ..cache.memory import kv_cache_bytes
from .predict import Device, token_seconds, ttft_s, weights_bytes
from .shape import ModelShape


def ring_step_bytes(c: int, n_kv_heads: int, head_dim: int, kv_dtype: str) -> int:
    """Bytes one ring step sends for one layer: the K and V of c positions."""
    return 2 * c * n_kv_heads * formats.BY_NAME[kv_dtype].row_bytes(head_dim)


def ring_step(c: int, n_heads: int, n_kv_heads: int, head_dim: int, kv_dtype: str,
              flops: float, link_bytes_s: float) -> tuple[int, float, float]:
    """One layer's ring step on a node holding c causal positions (two zigzag chunks):
    (bytes sent, seconds to send them at link_bytes_s, seconds to attend the block in hand at
    `flops` attention FLOP/s)."""
    nbytes = ring_step_bytes(c, n_kv_heads, head_dim, kv_dtype)
    return nbytes, nbytes / link_bytes_s, 4.0 * head_dim * n_heads * c * c / 2 / flops


def min_hiding_chunk(n_heads: int, n_kv_heads: int, head_dim: int, kv_dtype: str,
                     flops: float, link_bytes_s: float) -> int:
    """The fewest positions a node may hold for every ring step's transfer to hide."""
    row = formats.BY_NAME[kv_dtype].row_bytes(head_dim)
    return int(-(-flops * n_kv_heads * row // (head_dim * n_heads * link_bytes_s)))


@dataclass
class ParallelPrediction:
    nodes: int
    link_gbps: float
    link_latency_us: float
    ctx: int
    chunk: int  # prompt positions per node
    ttft_s: float
    ttft_s_one_node: float
    speedup: float
    step_bytes: int  # per layer and ring step
    step_transfer_s: float
    step_compute_s: float
    hidden: bool  # every transfer covered by the step's compute
    min_chunk: int  # positions per node from which transfers hide
    bytes_per_layer: int  # what one node sends per layer over the whole prompt
    kv_cache_bytes_per_node: int
    total_bytes_per_node: int
    memory_bytes: int
    fits: bool
    decode_tps: float  # at depth ctx, cache sharded
    decode_tps_one_node: float
    basis: dict

    def as_dict(self):
        return asdict(self)


def context_parallel(shape: ModelShape, device: Device, ctx: int, kv_dtype: str, nodes: int,
                     link_gbps: float, link_latency_us: float = 5.0) -> ParallelPrediction:
    if nodes < 2:
        raise ValueError(f"--nodes must be >= 2, got {nodes}")
    if not link_gbps > 0:
        raise ValueError(f"--link-gbps must be > 0, got {link_gbps}")
    if not link_latency_us >= 0:
        raise ValueError(f"--link-latency-us must be >= 0, got {link_latency_us}")
    if ctx < 2 * nodes:
        raise ValueError(f"a context of {ctx} cannot be split over {nodes} nodes (two chunks "
                         f"each): at least {2 * nodes} positions")
    L, H, H_kv, D = shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.head_dim
    B = link_gbps * 1e9 / 8
    F = device.tflops * 1e12 * device.e_attention
    c = -(-ctx // nodes)
    step_bytes, step_transfer, step_compute = ring_step(c, H, H_kv, D, kv_dtype, F, B)
    exposed = max(0.0, step_transfer - step_compute)
    min_chunk = min_hiding_chunk(H, H_kv, D, kv_dtype, F, B)
    peak = device.tflops * 1e12
    one = ttft_s(shape, device, ctx)
    mine = (shape.linear_flops_per_token() * c / (peak * device.e_linear)
            + shape.attention_flops(ctx) / nodes / (peak * device.e_attention)
            + L * (nodes - 1) * exposed)
    kv_node = kv_cache_bytes(L, H_kv, D, c, kv_dtype)  # every layer keeps its c positions
    activations = 0
    if device.name == "this":  # selfattn runs a node's whole share in one forward call
        from ..model.generate import activation_floats

        activations = 4 * c * activation_floats(shape.dim, shape.ffn_dim, H * D, H_kv * D)
    total = weights_bytes(shape, device) + kv_node + activations + 4 * shape.vocab
    bw = device.bandwidth_gbs * 1e9
    gather = L * (link_latency_us * 1e-6 + nodes * H * (D + 1) * 4 / B)
    token = (token_seconds(shape, device, 0, kv_dtype)
             + shape.kv_bytes(ctx, kv_dtype) / nodes / (bw * device.e_kv) + gather)
    basis = dict(device.basis, link=f"assumed: --link-gbps {link_gbps:g}, --link-latency-us "
                                    f"{link_latency_us:g}")
    return ParallelPrediction(
        nodes=nodes, link_gbps=link_gbps, link_latency_us=link_latency_us, ctx=ctx, chunk=c,
        ttft_s=mine, ttft_s_one_node=one, speedup=one / mine, step_bytes=step_bytes,
        step_transfer_s=step_transfer, step_compute_s=step_compute,
        hidden=step_compute >= step_transfer, min_chunk=min_chunk,
        bytes_per_layer=(nodes - 1) * step_bytes, kv_cache_bytes_per_node=kv_node,
        total_bytes_per_node=total, memory_bytes=device.memory_bytes,
        fits=total <= int(device.memory_bytes * device.usable),
        decode_tps=1.0 / token,
        decode_tps_one_node=1.0 / token_seconds(shape, device, ctx, kv_dtype), basis=basis)
