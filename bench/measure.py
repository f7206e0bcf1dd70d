"""Timing and memory for one case, the same for every framework: first call (compile + run), then `warmup` more
calls, then `repeats` timed calls whose median is the steady-state step time. Memory is the process's peak
resident set size (ru_maxrss), which is why each case runs in a fresh process."""
import os
import resource
import statistics
import sys
import time


def peak_rss_mb():
    """Peak resident set size of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def current_rss_mb():
    """Resident set size now (Linux /proc), or None elsewhere."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024.0 * 1024.0)
    except (OSError, ValueError, IndexError):
        return None


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_step(step, warmup, repeats):
    """Call `step()` (which must block until its result is computed) 1 + warmup + repeats times.

    Returns first_call_s (includes graph compilation), the steady-state times, their median, and the CPU seconds
    per steady step (cpu / wall shows how many cores the step really kept busy).
    """
    started = time.perf_counter()
    step()
    first = time.perf_counter() - started
    rss_after_first = peak_rss_mb()
    for _ in range(warmup):
        step()
    times, cpu = [], []
    for _ in range(repeats):
        cpu_start, started = cpu_seconds(), time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
        cpu.append(cpu_seconds() - cpu_start)
    median = statistics.median(times) if times else None
    return {
        "first_call_s": first,
        "compile_s": max(first - median, 0.0) if median is not None else None,
        "median_s": median,
        "min_s": min(times) if times else None,
        "times_s": times,
        "cpu_per_step_s": statistics.median(cpu) if cpu else None,
        "peak_rss_after_first_mb": rss_after_first,
        "peak_rss_mb": peak_rss_mb(),
        "rss_end_mb": current_rss_mb(),
    }


def load_average():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def measure_case(versions, steps, case, config):
    """The measurement every framework shares: RSS after import, build the step, RSS after building, then time it.
    `versions` is the framework's configure() result; `steps` maps step names to builders (case, config) ->
    (step, info)."""
    result = {"versions": versions, "peak_rss_import_mb": peak_rss_mb()}
    step, info = steps[case["step"]](case, config)
    result.update(info)
    result["peak_rss_built_mb"] = peak_rss_mb()
    result.update(time_step(step, case["warmup"], case["repeats"]))
    return result


# One case per fresh interpreter (the scripts' `--case JSON` mode), so each case's peak RSS is its own.
CASE_RESULT_PREFIX = "RESULT "


def print_case_result(result):
    """What a script's `--case` mode prints last: its result, one JSON line."""
    import json

    print(CASE_RESULT_PREFIX + json.dumps(result), flush=True)


def run_and_read_result(command, env, cwd, timeout=None, prefix=CASE_RESULT_PREFIX, tail_lines=5):
    """Run `command` in a fresh process; returns (the JSON result of its last `prefix` line, or None when it failed,
    printed none or ran past `timeout` seconds; the last `tail_lines` lines of its stderr (else stdout), or why
    it gave no result)."""
    import json
    import subprocess

    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=cwd, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-tail_lines:])
    lines = [line for line in done.stdout.splitlines() if line.startswith(prefix)]
    if done.returncode != 0 or not lines:
        return None, f"exited {done.returncode}: {tail}"
    return json.loads(lines[-1][len(prefix):]), tail


def run_case_in_fresh_process(script, case, timeout=None, tail_lines=5):
    """Run `python script --case JSON` with case["threads"] OpenMP threads and the repository on the path; returns
    the case updated with the result it printed (print_case_result), or with error=why it gave none
    (run_and_read_result)."""
    import json

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS=str(case["threads"]), PYTHONPATH=repo)
    result, tail = run_and_read_result([sys.executable, os.path.abspath(script), "--case", json.dumps(case)], env,
                                       repo, timeout, tail_lines=tail_lines)
    return dict(case, error=tail) if result is None else dict(case, **result)
