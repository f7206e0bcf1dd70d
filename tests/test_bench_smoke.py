"""bench/run.py's machinery on the `micro` config: cases run in their own processes and come back as a markdown
table and a JSON report of a fixed shape. Correctness of the tooling only: no timing is asserted."""
import json

import pytest

from bench import run as bench_run

ROW_KEYS = {"id", "framework", "step", "config", "frames", "mode", "attention", "threads", "ok", "first_call_s",
            "compile_s", "median_s", "min_s", "times_s", "cpu_per_step_s", "peak_rss_mb", "peak_rss_built_mb",
            "versions", "load_before", "wall_s"}


def test_plan_for_small_has_headline_rows_and_the_frame_sweep():
    _, cases = bench_run.plan_cases(bench_run.parse_args(["--config", "small", "--steps", "sample,train"]))
    ids = [case["id"] for case in cases]
    assert ids[:4] == ["tav/sample/graph/native/f8", "tav/sample/graph/chunked/f8", "tav/sample/pynative/native/f8",
                       "torch/sample/eager/sdpa/f8"]
    for frames in (4, 16, 24):
        assert f"tav/sample/graph/native/f{frames}" in ids and f"torch/sample/eager/sdpa/f{frames}" in ids
        assert f"tav/train/graph/native/f{frames}" not in ids  # train is swept only with --sweep-steps / --full
    assert "tav/train/pynative/native/f8" in ids and "tav/train/pynative/chunked/f8" not in ids
    assert all(case["threads"] == 2 and case["latent"] == 32 for case in cases)
    assert {case["chunk_budget"] for case in cases} == {None}  # the library's block budget unless --chunk-budget
    _, full = bench_run.plan_cases(bench_run.parse_args(["--config", "small", "--steps", "train", "--full"]))
    assert {"tav/train/pynative/chunked/f8", "tav/train/graph/native/f24"} <= {case["id"] for case in full}


def test_portable_rows_switch_the_native_kernels_off():
    assert bench_run.worker_env(2, "chunked")["TAV_NATIVE_KERNELS"] == "0"
    assert bench_run.worker_env(2, "math")["TAV_NATIVE_KERNELS"] == "0"
    assert bench_run.worker_env(2, "native")["TAV_NATIVE_KERNELS"] == "1"


def test_summary_gives_torch_ratios_and_frame_growth():
    config = bench_run.get_config("small")

    def row(framework, frames, median, rss, mode="graph", attention="math"):
        return {"framework": framework, "step": "sample", "frames": frames, "mode": mode, "attention": attention,
                "ok": True, "median_s": median, "peak_rss_mb": rss}

    results = [row("tav", 8, 2.0, 900.0), row("tav", 16, 4.2, 1500.0),
               row("torch", 8, 1.0, 1000.0, "eager", "sdpa"), row("torch", 16, 2.0, 1200.0, "eager", "sdpa")]
    summary = bench_run.summarise(results, config)
    ratios = {(s["step"], s["frames"]): s for s in summary["vs_torch"]}
    assert ratios[("sample", 8)]["time_ratio"] == pytest.approx(2.0)
    assert ratios[("sample", 8)]["peak_rss_ratio"] == pytest.approx(0.9)
    growth = {s["framework"]: s["time_vs_base"] for s in summary["frame_scaling"]}
    assert growth["tav"] == pytest.approx({"8": 1.0, "16": 2.1})
    text = bench_run.markdown_summary(summary)
    assert "| sample | 8 | math | sdpa | 2.00 | 0.90 |" in text and "F=16: 2.10x" in text


def test_micro_run_prints_the_table_and_writes_the_json(tmp_path, capsys):
    out = tmp_path / "micro.json"
    code = bench_run.main(["--config", "micro", "--steps", "attn1", "--frameworks", "tav,torch", "--modes", "graph",
                           "--attention", "math", "--repeats", "1", "--warmup", "0", "--json", str(out), "--quiet"])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert code == 0, [row.get("error") for row in report["results"]]
    assert [row["id"] for row in report["results"]] == ["tav/attn1/graph/math/f2", "torch/attn1/eager/sdpa/f2"]
    for row in report["results"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert len(row["times_s"]) == 1 and row["peak_rss_mb"] > 0
    assert report["config"]["name"] == "micro" and report["machine"]["logical_cpus"] >= 1
    assert report["results"][0]["versions"]["ms_op_threads"] == 2
    assert report["results"][1]["versions"]["torch_threads"] == 2
    assert report["summary"]["vs_torch"][0]["step"] == "attn1"
    header = "| " + " | ".join(bench_run.TABLE_COLUMNS) + " |"
    assert header in printed
    assert "| tav | attn1 | 2 | graph | math |" in printed and "| torch | attn1 | 2 | eager | sdpa |" in printed
