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
from mindspore import ops

from .math_attention import attend, heads_as_batch, math_attention, merge_heads

# Largest score block (elements) a block may hold by default: 2**24 fp32 scores = 64 MiB.
SCORE_BLOCK_ELEMENTS = 2**24


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
        budget = SCORE_BLOCK_ELEMENTS
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
