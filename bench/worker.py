"""`python -m bench.worker CASE_JSON`: run one case in this (fresh) process and print its result as one line
`BENCH_RESULT {json}`. Started by bench/run.py, which sets the thread environment before this imports anything."""
import json
import os
import sys
import traceback

RESULT_PREFIX = "BENCH_RESULT "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def use_this_checkout():
    """Import `tav` (and, through tav/__init__.py's alias, `tav.kernels`) from this repository rather than from
    wherever an editable install points; returns the files actually imported, for the record."""
    if sys.path[0] != ROOT:
        sys.path.insert(0, ROOT)
    import tav  # noqa: F401
    import tav.kernels  # noqa: F401

    return {name: sys.modules[name].__file__ for name in ("tav", "tav.kernels")}


def main(argv):
    case = json.loads(argv[1])
    sources = use_this_checkout()
    from bench.configs import get_config

    config = get_config(case["config"]).with_overrides(frames=case["frames"], latent=case["latent"],
                                                       batch=case["batch"], threads=case["threads"])
    try:
        if case["framework"] == "tav":
            from bench import tav_case as runner
        else:
            from bench import torch_case as runner
        result = runner.run(case, config)
        result["ok"] = True
        result["sources"] = sources
    except Exception as exc:  # reported in the table row, not fatal to the whole run
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
