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
