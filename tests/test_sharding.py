"""configs/tiny.py trained under several meshes of 8 simulated CPU devices equals one device; parameters
are really sharded as the logical rules say; a checkpoint written under one mesh resumes under another;
`nemojax.plan`'s bytes equal the real arrays'."""

from __future__ import annotations

import functools
import json
import os
import sys

import numpy as np
import pytest

from tests import background
from tests.test_train import REPO, subprocess_env

MESHES = {
    "data8": "data=8",
    "data2_fsdp2_expert2": "data=2,fsdp=2,expert=2",
    "fsdp4_tensor2": "fsdp=4,tensor=2",
    "fsdp2_tensor2_expert2": "fsdp=2,tensor=2,expert=2",
    "fsdp2_sequence4": "fsdp=2,sequence=4",  # context parallelism: each device a quarter of every sequence
    "resumed": "fsdp=4,tensor=2>fsdp=2,tensor=2,expert=2",  # after the two runs whose steps it reuses
}
GROUPS = (["data8", "data2_fsdp2_expert2", "fsdp2_sequence4"], ["fsdp4_tensor2", "fsdp2_tensor2_expert2", "resumed"])


def start_mesh_runs(name: str, runs: dict[str, str], devices: int) -> background.Job:
    script = os.path.join(REPO, "tests", "fixtures", "mesh_runs.py")
    return background.launch(name, [sys.executable, script, background.workspace(name),
                                    *(f"{k}:{v}" for k, v in runs.items())], subprocess_env(devices=devices))


def start_check(name: str) -> background.Job:
    """tests/fixtures/<name>.py on 8 simulated devices, in the background; `results` collects it. Each
    check compiles its programs and runs them once: it keeps the suite's unoptimised compilation."""
    env = subprocess_env(devices=8, training=False)
    return background.launch(name, [sys.executable, os.path.join(REPO, "tests", "fixtures", f"{name}.py")], env)


def check_results(name: str) -> dict:
    """The results of tests/fixtures/<name>.py: from its background run if the session started one."""
    return results(background.job(name, lambda: start_check(name)))


def results(job: background.Job) -> dict:
    assert job.wait() == 0, job.output(tail=3000)
    [line] = [line for line in job.stdout().splitlines() if line.startswith("RESULTS ")]
    return json.loads(line[len("RESULTS "):])


MESH_JOBS = [f"mesh_runs_{i}" for i in range(len(GROUPS))]


def start_all() -> list[background.Job]:
    """Two processes at once (compilation is mostly single-threaded), each a group of 8-device meshes; the
    resumed run comes after the runs it shares compiled steps with (persistent compilation cache).
    conftest.py starts them at collection, so they run beside the rest of the suite. The single-device run
    they are compared with is the multi-process check's `one`."""
    return [start_mesh_runs(name, {k: MESHES[k] for k in group}, devices=8) for name, group in zip(MESH_JOBS, GROUPS)]


@pytest.fixture(scope="module")
def runs():
    jobs = [background.Job(name) for name in MESH_JOBS] if background.started(MESH_JOBS[0]) else start_all()
    out: dict = {}
    for job in jobs:
        out.update(results(job))
    one = multihost_results()["one"]["losses"]  # the same 10 steps of configs/tiny.py, by train.py on one device
    out["one"] = {"losses": [one[str(step)] for step in range(1, 11)]}
    return out


@functools.cache
def multihost_results() -> dict:
    return check_results("multihost_runs")


@pytest.mark.parametrize("name", list(MESHES))
def test_mesh_gives_the_single_device_losses(runs, name):
    assert runs[name]["devices"] == 8
    assert len(runs[name]["losses"]) == 10
    np.testing.assert_allclose(runs[name]["losses"], runs["one"]["losses"], rtol=1e-4)


@pytest.mark.parametrize("name", list(MESHES))
def test_parameters_are_sharded_by_the_rules(runs, name):
    run = runs[name]
    assert run["wrong_sharding"] == []
    specs = run["specs"]
    if "data8" == name:  # pure data parallelism: every parameter whole on every device
        assert run["split"] == []
        return
    assert len(run["split"]) >= run["arrays"] // 2, run["split"]
    mesh = MESHES[name].split(">")[-1]
    if "fsdp" in mesh:
        assert "fsdp" in specs["['embed']"]
    if "tensor" in mesh:
        assert "tensor" in specs["['layers_1']['mixer']['q_proj']"]
        assert "tensor" in specs["['layers_0']['mixer']['in_x']"]
    if "expert" in mesh:
        assert specs["['layers_2']['mixer']['experts_up']"].startswith("P('expert'")


@pytest.mark.parametrize("name", list(MESHES))
def test_plan_equals_the_real_arrays(runs, name):
    """`nemojax.plan`'s per-device parameter and optimizer bytes (from shapes and shardings alone) equal
    what the trained arrays occupy on a device; XLA's analysis of the same step is reported beside."""
    run = runs[name]
    for key in ("params_bytes", "optimizer_bytes"):
        assert run["plan"][key] == run["measured"][key], key
    assert run["plan"]["temp_bytes"] > 0
    assert run["plan"]["argument_bytes"] >= run["plan"]["params_bytes"] + run["plan"]["optimizer_bytes"]


def test_expert_parallel_moe_equals_one_device():
    """Experts split over 4 devices: outputs and gradients equal the single-device MoE, with half of the
    experts receiving no token at all, through both exchanges: the padded all-to-all (CPU) and the
    ragged all-to-all (GPU, TPU; its collective emulated here, and lowered for CUDA and TPU)."""
    result = check_results("expert_parallel_check")
    assert result["tokens_per_expert"].count(0) == 4
    for exchange in ("padded", "ragged"):
        assert result[exchange]["output"] < 1e-5 and result[exchange]["grads"] < 1e-5, (exchange, result)
    assert result["padded"]["all_to_all"] >= 2  # the exchange really is an all-to-all
    assert result["ragged"]["all_to_all"] == 0  # ... and the ragged one is not a padded one
    for platform in ("cuda", "tpu"):  # two exchanges and the return; their transposes in the gradient
        assert result["ragged_all_to_all_lowered"][f"{platform} forward"] == 3, result
        assert result["ragged_all_to_all_lowered"][f"{platform} gradient"] >= 5, result


def test_two_processes_give_the_single_device_losses():
    """train.py as 2 processes x 4 CPU devices (local coordinator, gloo; mesh fsdp=4 x sequence=2 across
    both, each process reading half of every batch, both writing the checkpoint) trains 10 steps with one
    device's losses; a checkpoint written by 2 processes resumes in 1, and one written by 1 in 2, with the
    uninterrupted run's losses."""
    result = multihost_results()
    steps = [str(s) for s in range(1, 11)]
    assert sorted(result["one"]["losses"], key=int) == steps
    one = [result["one"]["losses"][s] for s in steps]
    for name, processes, resumed in (("one", 1, []), ("two", 2, []), ("two_to_one", 1, ["5"]),
                                     ("one_to_two", 2, ["5"])):
        run = result[name]
        assert run["exit_codes"] == [0] * processes, (name, run["console_tail"])
        assert run["resumed_from"] == resumed, name  # the first process says so; the losses alone could not tell
        assert run["checkpoints"] == ["10", "5"], (name, run["checkpoints"])
        np.testing.assert_allclose([run["losses"][s] for s in steps], one, rtol=1e-5, err_msg=name)
