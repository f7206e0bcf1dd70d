"""The sparse-causal attn1 of the `small` bench config, whole and its frame gather alone (forward, GRAPH_MODE, ms
per call, median), with the process's peak RSS. Written to compare two checkouts A B A B on one machine: run it with
PYTHONPATH set to each in turn (it imports whatever `tav` comes first on the path; a checkout from before the
kernel reorganisation works too, its root `kernels/` package included).

    for repo in OLD NEW OLD NEW; do PYTHONPATH=$repo python bench/attn1_parts.py --threads 1; done
"""
import argparse
import os
import sys

import numpy as np

# Appended, not prepended: the `tav` on PYTHONPATH is the one measured (bench.measure is the same in both).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.measure import peak_rss_mb, time_step  # noqa: E402


def median_ms(call, repeats):
    return 1e3 * time_step(call, warmup=1, repeats=repeats)["median_s"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="MindSpore CPU op threads")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--frames", type=int, default=8)
    args = parser.parse_args(argv)
    import mindspore as ms

    ms.set_device("CPU")
    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    ms.set_context(mode=ms.GRAPH_MODE)
    import tav
    from tav.models.attention import SparseCausalAttention, SparseCausalContext

    frames = args.frames
    # The small config's first block: 64 channels, 8 heads, 32x32 latents, the CFG batch of 2 videos.
    layer = SparseCausalAttention(64, heads=8, dim_head=8, attention_backend="native")
    layer.set_train(False)
    tokens = ms.Tensor(np.random.default_rng(0).standard_normal((2 * frames, 1024, 64), dtype=np.float32))

    class Gather(ms.nn.Cell):
        def __init__(self):
            super().__init__()
            self.context = SparseCausalContext()

        def construct(self, x):
            return self.context(x, frames)

    gather = Gather()
    gather.set_train(False)
    whole = median_ms(lambda: layer(tokens, frames).asnumpy(), args.repeats)
    alone = median_ms(lambda: gather(tokens).asnumpy(), args.repeats)
    peak = peak_rss_mb()
    print(f"{tav.__file__}: attn1 {whole:.1f} ms, frame gather {alone:.2f} ms, native gather "
          f"{gather.context.native is not None}, peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
