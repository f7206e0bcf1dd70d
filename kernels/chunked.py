"""Math attention over query chunks: the same numbers as math_attention, with a bounded score tensor.

The (B*H, Nq, Nk) score tensor is what runs out of memory first: Tune-A-Video's sparse-causal attn1 at 512 px has
Nq = 4096 queries against Nk = 8192 keys per frame. Each query row's softmax only needs its own row, so splitting
queries into chunks and concatenating the outputs is exact; only the chunk's (B*H, chunk, Nk) block is alive at
once. Chunk boundaries are Python constants, so graph mode unrolls the loop into a static graph.
"""
from mindspore import ops

from .math_attention import math_attention

# Largest score block (elements) a default chunk may hold: 2**27 fp32 scores = 512 MiB.
SCORE_BLOCK_ELEMENTS = 2**27


def default_chunk_size(batch, num_heads, nq, nk, budget=None):
    """Most queries per chunk whose (batch*heads, chunk, nk) score block stays within `budget` elements
    (default SCORE_BLOCK_ELEMENTS)."""
    if budget is None:
        budget = SCORE_BLOCK_ELEMENTS
    per_query = batch * num_heads * nk
    return max(1, min(nq, budget // per_query))


def chunked_attention(q, k, v, num_heads, upcast=False, chunk_size=None):
    """math_attention computed `chunk_size` queries at a time; the last chunk may be shorter."""
    b, nq, _ = q.shape
    if chunk_size is None:
        chunk_size = default_chunk_size(b, num_heads, nq, k.shape[1])
    if chunk_size >= nq:
        return math_attention(q, k, v, num_heads, upcast)
    outputs = []
    for start in range(0, nq, chunk_size):
        stop = min(start + chunk_size, nq)
        outputs.append(math_attention(q[:, start:stop], k, v, num_heads, upcast))
    return ops.cat(outputs, 1)
