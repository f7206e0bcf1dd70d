"""Math attention in blocks of whole query rows: the same numbers as math_attention, a bounded score tensor.

The (B*H, Nq, Nk) score tensor is what runs out of memory first: Tune-A-Video's sparse-causal attn1 at 512 px has
Nq = 4096 queries against Nk = 8192 keys per frame. Each query row's softmax only needs its own row, so computing
the rows in blocks and concatenating the outputs is exact. Blocks are taken along B*H first (every frame and head
is an independent attention, and its keys come with it) and cut along the queries only when a single (frame,
head) holds more scores than the budget. Block boundaries are Python constants, so graph mode unrolls the loop
into a static graph.

On CPU the blocks are also faster: a score block that stays in cache between the product, the softmax and the
second product saves memory traffic. `small` bench config, attn1 at 32x32 (128 frame-heads, 1024 x 2048 scores,
2 threads): one 1 GiB block 0.42 s, sixteen 64 MiB blocks 0.23 s (best of 5).
"""
import mindspore as ms
from mindspore import nn, ops

from tav import backend

from .math import attend, heads_as_batch, math_attention, merge_heads

_scores = ops.BatchMatMul(transpose_b=True)  # a b^T
_transposed_product = ops.BatchMatMul(transpose_a=True)  # a^T b
_product = ops.BatchMatMul()

# Largest score block (elements) a block may hold by default on the CPU: 2**24 fp32 scores = 64 MiB (cache-sized
# blocks are also faster there). On an accelerator the budget is larger, so blocks stay big enough to keep the
# matrix units busy, and still bounded: 2**28 scores = 1 GiB fp32 (a whole 512 px sparse-causal attn1 would be 51 GB).
SCORE_BLOCK_ELEMENTS = 2**24
DEVICE_SCORE_BLOCK_ELEMENTS = 2**28


def score_budget(device=None):
    """Score elements one block may hold on `device` (default: the device tav builds for), and above which `auto`
    chunks."""
    if device is None:
        device = backend.device_target()
    return SCORE_BLOCK_ELEMENTS if device == "CPU" else DEVICE_SCORE_BLOCK_ELEMENTS


@ops.constexpr
def _current_budget():
    # A compile-time constant in graph mode (block boundaries must be Python ints there).
    return score_budget()


def default_chunk_size(batch, num_heads, nq, nk, budget=None):
    """Most queries per chunk whose (batch*heads, chunk, nk) score block stays within `budget` elements
    (default SCORE_BLOCK_ELEMENTS), all batch*heads rows together."""
    if budget is None:
        budget = SCORE_BLOCK_ELEMENTS
    per_query = batch * num_heads * nk
    return max(1, min(nq, budget // per_query))


def block_plan(batch, num_heads, nq, nk, budget=None):
    """(rows, queries): batch*heads rows and queries per block so that rows * queries * nk <= budget (at least
    one query of one row). Whole rows first; queries are cut only when one row exceeds the budget."""
    if budget is None:
        budget = _current_budget()
    total_rows = batch * num_heads
    if nq * nk <= budget:
        return max(1, min(total_rows, budget // (nq * nk))), nq
    return 1, max(1, min(nq, budget // nk))


def chunked_attention(q, k, v, num_heads, upcast=False, chunk_size=None):
    """math_attention computed in blocks. With `chunk_size`, blocks of that many queries over all batch*heads
    rows (the last may be shorter); without, block_plan's blocks under SCORE_BLOCK_ELEMENTS."""
    b, nq, inner = q.shape
    nk = k.shape[1]
    head_dim = inner // num_heads
    scale = head_dim**-0.5
    if chunk_size is None:
        rows, queries = block_plan(b, num_heads, nq, nk)
    else:
        rows, queries = b * num_heads, chunk_size
    if rows >= b * num_heads and queries >= nq:
        return math_attention(q, k, v, num_heads, upcast)
    qh, kh, vh = heads_as_batch(q, num_heads), heads_as_batch(k, num_heads), heads_as_batch(v, num_heads)
    row_blocks = []
    previous = None
    for r in range(0, b * num_heads, rows):
        r_end = min(r + rows, b * num_heads)
        k_rows, v_rows = kh[r:r_end], vh[r:r_end]
        query_blocks = []
        for s in range(0, nq, queries):
            q_block = qh[r:r_end, s:min(s + queries, nq)]
            if previous is not None:
                # Blocks are independent, so the graph runtime would run them concurrently, each with its own
                # score block alive: a dependency on the previous block keeps one in memory at a time.
                q_block = ops.depend(q_block, previous)
            previous = attend(q_block, k_rows, v_rows, scale, upcast)
            query_blocks.append(previous)
        row_blocks.append(query_blocks[0] if len(query_blocks) == 1 else ops.cat(query_blocks, 1))
    out = row_blocks[0] if len(row_blocks) == 1 else ops.cat(row_blocks, 0)
    return merge_heads(out.reshape(b, num_heads, nq, head_dim)).astype(q.dtype)


class BlockedAttention(nn.Cell):
    """chunked_attention as a Cell whose backward also works block by block.

    Autodiff would keep every block's probabilities for the backward pass and then build the (B*H, Nq, Nk)
    gradients of scores and probabilities at once: 4.8 GiB for one sparse-causal attn1 at the `small` bench
    config (8 frames, 32x32). This bprop recomputes each block's probabilities from q and k (as flash attention
    does) and forms its gradients there, so one block of scores is alive at a time:
        P = softmax(s q k^T),  dV += P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
        dQ = s dS K,  dK += s dS^T Q.
    Same mathematics as autodiff of the forward; the gradients agree to float rounding.
    """

    def __init__(self, num_heads, upcast=False):
        super().__init__()
        self.num_heads = num_heads
        self.upcast = upcast

    def construct(self, q, k, v):
        return chunked_attention(q, k, v, self.num_heads, self.upcast)

    def bprop(self, q, k, v, out, dout):
        heads = self.num_heads
        b, nq, inner = q.shape
        nk = k.shape[1]
        head_dim = inner // heads
        scale = head_dim**-0.5
        compute = ms.float32 if self.upcast else q.dtype
        qh = heads_as_batch(q, heads).astype(compute) * scale
        kh = heads_as_batch(k, heads).astype(compute)
        vh = heads_as_batch(v, heads).astype(compute)
        doh = heads_as_batch(dout, heads).astype(compute)
        # rowsum(dP * P) = rowsum(dO * O): the softmax backward's correction, one number per query.
        correction = (doh * heads_as_batch(out, heads).astype(compute)).sum(-1)
        rows, queries = block_plan(b, heads, nq, nk)
        total = b * heads
        dq_rows, dk_rows, dv_rows = [], [], []
        previous = None
        for r in range(0, total, rows):
            r_end = min(r + rows, total)
            k_rows, v_rows = kh[r:r_end], vh[r:r_end]
            dq_blocks, dk_sum, dv_sum = [], None, None
            for s in range(0, nq, queries):
                s_end = min(s + queries, nq)
                q_block = qh[r:r_end, s:s_end]
                if previous is not None:
                    q_block = ops.depend(q_block, previous)  # one block of scores alive at a time
                do_block = doh[r:r_end, s:s_end]
                probs = ops.softmax(_scores(q_block, k_rows), -1)
                d_probs = _scores(do_block, v_rows)
                # dP - correction as a bias_add over (row, query) "channels": a broadcasting Sub would hold its
                # workspace until the graph ends, and an explicit BroadcastTo copy cost ~1 s per train step.
                shifted = ops.bias_add(d_probs.reshape(1, -1, nk), -correction[r:r_end, s:s_end].reshape(-1))
                d_scores = probs * shifted.reshape(d_probs.shape)
                dv = _transposed_product(probs, do_block)
                dk = _transposed_product(d_scores, q_block)
                dq_blocks.append(_product(d_scores, k_rows) * scale)
                dv_sum = dv if dv_sum is None else dv_sum + dv
                dk_sum = dk if dk_sum is None else dk_sum + dk
                previous = dq_blocks[-1]
            dq_rows.append(dq_blocks[0] if len(dq_blocks) == 1 else ops.cat(dq_blocks, 1))
            dk_rows.append(dk_sum)
            dv_rows.append(dv_sum)
        return (_merge_row_blocks(dq_rows, b, heads, q.dtype), _merge_row_blocks(dk_rows, b, heads, k.dtype),
                _merge_row_blocks(dv_rows, b, heads, v.dtype))


def _merge_row_blocks(blocks, batch, num_heads, dtype):
    """(rows, N, D) blocks in row order -> (batch, N, H*D) in `dtype`."""
    whole = blocks[0] if len(blocks) == 1 else ops.cat(blocks, 0)
    return merge_heads(whole.reshape((batch, num_heads) + whole.shape[1:])).astype(dtype)
