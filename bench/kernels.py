"""Time the attention backends one call at a time: ms per call, forward and forward+backward, best of N.

    python bench/kernels.py attention [--repeats 5] [--cases attn1_small,attn2_small] [--torch]

The shapes are the UNet's attention calls at the `small` bench config and at Stable Diffusion's head dims
(docs/kernels.md holds the table this produced). The backward is value_and_grad of sum(out * w) with respect to
q, k and v, in GRAPH mode, through the Cells the model trains with. --torch adds PyTorch's scaled_dot_product_attention at the same shapes.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (batch, queries, keys, heads, head dim)
CASES = {
    "attn1_small": (16, 1024, 2048, 8, 8),
    "attn1_16x16": (16, 256, 512, 8, 16),
    "attn2_small": (16, 1024, 77, 8, 8),
    "attn_temp": (2048, 8, 8, 8, 8),
    "sd_32x32_d40": (16, 1024, 2048, 8, 40),
    "sd_32x32_d80": (16, 1024, 2048, 8, 80),
    "sd_16x16_d160": (16, 256, 512, 8, 160),
}
BACKENDS = ("chunked", "math", "native", "native+lse")


def best_ms(fn, repeats):
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def tav_timings(backend_name, shape, repeats):
    import mindspore as ms
    from mindspore import nn

    from tav.kernels import AttentionKernel
    from tav.kernels.cpu.attention import NativeAttention, NativeAttentionWithLse

    b, nq, nk, h, d = shape
    rng = np.random.default_rng(0)
    q, k, v = (ms.Tensor(rng.standard_normal((b, n, h * d)).astype(np.float32)) for n in (nq, nk, nk))
    w = ms.Tensor(rng.standard_normal((b, nq, h * d)).astype(np.float32))

    # As the model trains them: chunked through BlockedAttention (its backward recomputes per block); native
    # without and with the kept log-sum-exp (AttentionKernel's choice is the latter).
    cells = {"chunked": lambda: AttentionKernel(h, "chunked"), "math": lambda: AttentionKernel(h, "math"),
             "native": lambda: NativeAttention(h), "native+lse": lambda: NativeAttentionWithLse(h)}

    class Forward(nn.Cell):
        def __init__(self):
            super().__init__()
            self.kernel = cells[backend_name]()

        def construct(self, q, k, v):
            return self.kernel(q, k, v)

    class Loss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.forward = Forward()

        def construct(self, q, k, v, w):
            return (self.forward(q, k, v) * w).sum()

    forward = Forward()
    grad = ms.jit(ms.value_and_grad(Loss(), grad_position=(0, 1, 2)))
    forward_ms = None if backend_name == "native+lse" else best_ms(lambda: forward(q, k, v).asnumpy(), repeats)
    backward_ms = best_ms(lambda: grad(q, k, v, w)[0].asnumpy(), repeats)
    return forward_ms, backward_ms


def torch_timings(shape, repeats):
    import torch

    b, nq, nk, h, d = shape
    q = torch.randn(b, h, nq, d, requires_grad=True)
    k, v = (torch.randn(b, h, nk, d, requires_grad=True) for _ in range(2))
    w = torch.randn(b, h, nq, d)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def forward():
        with torch.no_grad():
            sdpa(q, k, v)

    def backward():
        (sdpa(q, k, v) * w).sum().backward()

    return best_ms(forward, repeats), best_ms(backward, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernel", choices=["attention"])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: " + ", ".join(BACKENDS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch", action="store_true", help="also time PyTorch's scaled_dot_product_attention")
    args = parser.parse_args(argv)

    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    columns = [name for name in args.backends.split(",") if name] + (["torch sdpa"] if args.torch else [])
    print("| case | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for case in args.cases.split(","):
        shape = CASES[case]
        cells = []
        for column in columns:
            forward_ms, backward_ms = torch_timings(shape, args.repeats) if column == "torch sdpa" else \
                tav_timings(column, shape, args.repeats)
            cells.append(("-" if forward_ms is None else f"{forward_ms:.1f}") + f" / {backward_ms:.1f}")
        print(f"| {case} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
