"""`python -m nemojax.plan`: per-device memory of released configs on large simulated meshes."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.test_train import REPO, subprocess_env


def run_plan(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "nemojax.plan", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def gib(text: str, label: str) -> float:
    return float(re.search(rf"{label}\s+([\d.]+) GiB", text).group(1))


@pytest.mark.parametrize("config, mesh, devices, billions, memory, verdict", [
    ("nemotron_3_nano_30b_a3b.py", ["--config.mesh.fsdp=16", "--config.mesh.expert=4"], 64, 31.6, 80, "fits"),
    ("nemotron_h_8b.py", ["--config.mesh.fsdp=8"], 8, 8.1, 12, "does NOT fit"),
])
def test_plan_for_released_models(config, mesh, devices, billions, memory, verdict):
    out = run_plan(f"--config={os.path.join(REPO, 'configs', config)}", *mesh, "--config.mesh.data=1",
                   "--nocompile", f"--device_memory_gib={memory}")
    assert f"({devices} devices)" in out
    total = float(re.search(r"([\d.]+)B parameters", out).group(1))
    assert total == pytest.approx(billions, rel=0.03)
    # fp32 parameters: routed experts split over the whole mesh, the rest over fsdp (and replicated over
    # expert); AdamW's two moments beside them.
    params, full = gib(out, "parameters"), total * 1e9 * 4 / 2**30
    fsdp = int(re.search(r"'fsdp': (\d+)", out).group(1))
    assert full / devices * 0.99 <= params <= full / fsdp * 1.01
    if "expert" not in " ".join(mesh):
        assert params == pytest.approx(full / devices, rel=0.02)
    assert gib(out, "optimizer state") == pytest.approx(2 * params, rel=0.01)
    # Without compilation the total is parameters + optimizer state + gradients, held against the memory.
    total_gib = float(re.search(rf"total ([\d.]+) GiB per device: {verdict} in {memory} GiB", out).group(1))
    assert total_gib == pytest.approx(gib(out, "parameters") + gib(out, "optimizer state") + gib(out, "gradients"),
                                      abs=0.02)


def test_find_mesh_takes_the_smallest_slice_that_fits(monkeypatch):
    """The search over slices for one 1M-token Nemotron 3 Nano sequence: the candidate meshes (batch 1:
    no fsdp; tensor 1 or 2, as the 2 KV heads allow; the rest on sequence), and the first slice, smallest
    first, whose plan fits, skipping meshes whose weights alone do not and compiling at most 2 per slice.
    The plans are stand-ins (memory falling as 1/devices), so the search is checked without compiling."""
    import math

    from configs import nemotron_3_nano_30b_a3b as nano
    from nemojax import plan as planning

    config = nano.get_config()
    config.seq_len, config.batch_size = 2**20, 1
    assert planning.candidate_meshes(config, 64) == [
        {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, "sequence": 64},
        {"data": 1, "fsdp": 1, "tensor": 2, "expert": 1, "sequence": 32}]
    assert planning.candidate_meshes(config, 4096) == []  # spans of 256 or 512 tokens: under 1024

    gib, compiled = planning.GIB, []

    def stand_in(trial, compile_step=True, fit=False, devices=None):
        n = math.prod(trial.mesh[a] for a in ("data", "fsdp", "tensor", "expert", "sequence"))
        result = {"params_bytes": 700 * gib / n, "optimizer_bytes": 0, "gradient_bytes": 0, "mesh": dict(trial.mesh)}
        if compile_step:
            assert fit
            compiled.append(dict(trial.mesh))
            result["peak_bytes"] = result["params_bytes"] + 4000 * gib / n * (1.5 if trial.mesh.tensor == 2 else 1)
        return result

    monkeypatch.setattr(planning, "plan", stand_in)
    found = planning.find_mesh(config, [8, 16, 32, 64, 128], device_memory_gib=80, log=lambda line: None)
    assert found["mesh"]["sequence"] == 64 and found["mesh"]["tensor"] == 1  # (700 + 4000) / 64 = 73.4 GiB
    # 8 devices: the weights alone (87.5 GiB) do not fit, nothing compiles; 16 and 32: both meshes compile.
    assert [math.prod(m.values()) for m in compiled] == [16, 16, 32, 32, 64]
