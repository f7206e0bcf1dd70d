"""The native CPU layout copies (kernels/cpu/layout.cc) as Cells with their own backward.

SwapMiddleAxesFunction: (A, B, C, D) -> (A, C, B, D). FrameGatherFunction: the frames a table names, side by side,
for attn1's keys/values (the table is tav.models.attention's frame policy; this kernel knows no policy). Both only
copy, so they match the MindSpore ops they replace bit for bit; they exist for memory (layout.cc says why).
"""
from mindspore import ops

from .aot import KernelFunction

LIBRARY = "layout"


def _swapped_shape(x):
    return [x[0], x[2], x[1], x[3]]


class SwapMiddleAxesFunction(KernelFunction):
    """(A, B, C, D) -> (A, C, B, D) for fp32; the backward is the same swap the other way. MindSpore 2.10's CPU
    Transpose kernel holds twice its output as workspace for as long as the graph lives (a 64 MiB transpose kept
    128 MiB), ~150 MiB of a small-bench sampling step; this op holds nothing."""

    LIBRARY = LIBRARY

    def __init__(self):
        super().__init__()
        self.swap_op = self.op("swap_middle_axes", _swapped_shape)

    def construct(self, x):
        return self.swap_op(x)

    def bprop(self, x, out, dout):
        return (self.swap_op(dout),)


def _gathered_tokens(x, table):
    return [x[0], table[1] * x[1], x[2]]


def _scattered_tokens(dy, table):
    return [dy[0], dy[1] // table[1], dy[2]]


class FrameGatherFunction(KernelFunction):
    """((B F), D, C) fp32 and a table (F, S) int32 of source frames -> ((B F), S*D, C): for frame i the tokens of
    frames table[i, 0], ..., table[i, S-1] of the same video, in one copy (MindSpore ops need slices, broadcasts
    and concatenations or a gather, whose workspaces stay alive; more so in their backward). The backward adds
    every copy's gradient back to its source frame."""

    LIBRARY = LIBRARY

    def __init__(self):
        super().__init__()
        self.forward_op = self.op("frame_gather_fwd", _gathered_tokens)
        self.backward_op = self.op("frame_gather_bwd", _scattered_tokens)

    def construct(self, x, table):
        return self.forward_op(x, table)

    def bprop(self, x, table, out, dout):
        return self.backward_op(dout, table), ops.zeros_like(table)
