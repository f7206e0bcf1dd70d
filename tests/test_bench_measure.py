"""bench.measure's fresh-process runner, which every benchmark's table rows come through: a result line read back,
and a failure or timeout reported as why, never as a missing row."""
import json
import os
import sys

from bench.measure import CASE_RESULT_PREFIX, run_and_read_result, run_case_in_fresh_process


def _python(code):
    return [sys.executable, "-c", code]


def test_the_last_result_line_is_read_back():
    prints = [f"print({CASE_RESULT_PREFIX!r} + json.dumps({{'a': {n}}}))" for n in (1, 2)]
    code = "; ".join(["import json", "print('noise')", *prints])
    result, _ = run_and_read_result(_python(code), dict(os.environ), ".")
    assert result == {"a": 2}


def test_a_failure_and_a_timeout_say_why():
    result, why = run_and_read_result(_python("import sys; print('it broke', file=sys.stderr); sys.exit(3)"),
                                      dict(os.environ), ".")
    assert result is None and why == "exited 3: it broke"
    result, why = run_and_read_result(_python("print('no result line')"), dict(os.environ), ".")
    assert result is None and why.startswith("exited 0")
    result, why = run_and_read_result(_python("import time; time.sleep(5)"), dict(os.environ), ".", timeout=0.5)
    assert result is None and why.startswith("timed out")


def test_a_case_script_gets_its_case_and_threads(tmp_path):
    script = tmp_path / "case.py"
    script.write_text("import json, os, sys\n"
                      "from bench.measure import print_case_result\n"
                      "case = json.loads(sys.argv[2])\n"
                      "print_case_result(dict(case, omp=os.environ['OMP_NUM_THREADS']))\n")
    assert run_case_in_fresh_process(str(script), {"threads": 3, "n": 1}) == {"threads": 3, "n": 1, "omp": "3"}
    script.write_text("raise SystemExit('bad case')\n")
    failed = run_case_in_fresh_process(str(script), {"threads": 1})
    assert failed["threads"] == 1 and "bad case" in failed["error"]
    assert json.dumps(failed)  # a table row, whatever happened
