"""The accelerator benchmark's CPU smoke run: every part runs (kernels interpreted) and reports sound numbers."""

from __future__ import annotations

import json

from benchmarks import accelerator


def test_accelerator_benchmark_smoke_run(tmp_path):
    out = tmp_path / "accelerator.json"
    results = accelerator.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert [row["dtype"] for row in results["correctness"]] == ["float32", "bfloat16"]
    for row in results["correctness"]:
        assert row["ok"] and len(row["errors"]) == 9, row  # y, final state, and 7 input gradients
    assert {(r["impl"], r["direction"]) for r in results["ssd"]} == {
        (impl, direction) for impl in ("xla", "kernels") for direction in ("forward", "forward+backward")}
    assert all(r["ms"] > 0 for r in results["ssd"])
    xla, kernels = results["train_step"]
    assert xla["ssm_impl"] == "xla -> xla" and kernels["ssm_impl"] == "pallas -> pallas"
    for row in (xla, kernels):
        assert row["step_s"] > 0 and row["compile_s"] > 0 and row["temp_gib"] is not None


def test_hlo_profile_reads_the_step_exported_for_cuda():
    from benchmarks import hlo_profile

    kinds = hlo_profile.main(["--smoke"])
    assert kinds["custom_call"]["count"] >= 8  # the Triton SSD kernels, forward and backward
    assert kinds["dot_general"]["count"] > 0 and kinds["dot_general"]["bytes"] > 0
    assert 0 < kinds["multiply"]["param_bytes"] <= kinds["multiply"]["bytes"]  # AdamW works on parameter shapes
    assert hlo_profile.result_types("%3 = stablehlo.convert %2 : (tensor<4x8xf32>) -> tensor<4x8xbf16>") == [
        ((4, 8), "bf16")]
