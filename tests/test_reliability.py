"""Faults and bad input a user can hit (issue 17): each gets a safe outcome and one line naming the culprit.

Corrupted checkpoints fall back to the previous step with the uninterrupted run's losses; a second run on a
workdir stops at once; a changed config is refused on resume; bad sampling, scoring and data options, files
and converter arguments are reported in one line, leaving nothing behind.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nemojax.config import ConfigError
from tests.test_train import REPO, micro, read_metrics, train_cli


# ----- training: checkpoint fallback, resume checks, the workdir lock ----------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An uninterrupted micro run of 6 steps with checkpoints at 2, 4 and 6."""
    from nemojax.train.trainer import Trainer

    workdir = str(tmp_path_factory.mktemp("reliability") / "run")
    Trainer(micro(checkpoint_every=2), workdir).run()
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]
    return workdir


def _truncate_largest_array_file(step_dir: str) -> None:
    files = [p for p in glob.glob(os.path.join(step_dir, "params", "**", "*"), recursive=True) if os.path.isfile(p)]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)


def _break_meta_json(step_dir: str) -> None:
    for path in glob.glob(os.path.join(step_dir, "meta", "*")):
        if os.path.isfile(path):
            with open(path, "w") as f:
                f.write('{"step": ')


CORRUPTIONS = {
    "truncated_array": _truncate_largest_array_file,
    "params_deleted": lambda step_dir: shutil.rmtree(os.path.join(step_dir, "params")),
    "meta_json_broken": _break_meta_json,
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupted_latest_checkpoint_falls_back_to_the_previous_one(finished_run, tmp_path, capfd, corruption):
    from nemojax.train.trainer import Trainer

    workdir = str(tmp_path / "run")
    shutil.copytree(finished_run, workdir)
    CORRUPTIONS[corruption](os.path.join(workdir, "checkpoints", "6"))
    capfd.readouterr()
    Trainer(micro(checkpoint_every=2), workdir).run()
    err = capfd.readouterr().err
    moved = os.path.join(workdir, "corrupt_checkpoints", "6")
    assert f"checkpoint {workdir}/checkpoints/6 cannot be restored" in err and f"moved it to {moved}" in err, err
    assert f"resuming from step 4 (checkpoint {workdir}/checkpoints/4)" in err, err
    assert os.path.isdir(moved)  # kept for inspection, never deleted
    want = {r["step"]: r["loss"] for r in read_metrics(finished_run)}
    got = {r["step"]: r["loss"] for r in read_metrics(workdir)[-2:]}
    assert got == {5: want[5], 6: want[6]}


def test_no_restorable_checkpoint_is_one_clear_error(finished_run, tmp_path):
    from nemojax.train.trainer import Trainer, TrainingError

    workdir = str(tmp_path / "run")
    shutil.copytree(finished_run, workdir)
    for step in (2, 4, 6):
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(step), "params"))
    with pytest.raises(TrainingError, match="no checkpoint in .* restores; moved aside: .*corrupt_checkpoints/6"):
        Trainer(micro(checkpoint_every=2), workdir).run()
    assert sorted(os.listdir(os.path.join(workdir, "corrupt_checkpoints"))) == ["2", "4", "6"]


def test_resume_refuses_a_changed_seq_len_and_says_an_extended_total_steps(finished_run, tmp_path, capfd):
    from nemojax.train.trainer import Trainer

    workdir = str(tmp_path / "run")
    shutil.copytree(finished_run, workdir)
    with pytest.raises(ConfigError, match=r"resuming from step 6 with a different config \(seq_len: checkpoint "
                                          r"32, now 16\)"):
        Trainer(micro(checkpoint_every=2, seq_len=16), workdir).run()
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]  # nothing touched
    capfd.readouterr()
    Trainer(micro(checkpoint_every=2, total_steps=7), workdir).run()
    err = capfd.readouterr().err
    assert "resuming from step 6" in err and "changed: total_steps: 6 -> 7" in err, err
    assert "compiling the train step" in err
    assert read_metrics(workdir)[-1]["step"] == 7
    Trainer(micro(checkpoint_every=2, total_steps=8, seed=3, allow_config_change=True), workdir).run()
    assert read_metrics(workdir)[-1]["step"] == 8


def test_fields_a_saved_config_lacks_are_not_compared():
    from nemojax.train.trainer import check_resume_config

    config = micro()
    saved = json.loads(json.dumps(config.to_dict()))
    del saved["scan_layers"], saved["data"]["shuffle_seed"]  # written by an older nemojax
    saved["seq_len"] = 64
    with pytest.raises(ConfigError, match=r"\(seq_len: checkpoint 64, now 32\)"):
        check_resume_config(3, saved, config)
    del saved["seq_len"]
    assert check_resume_config(3, saved, config) == []


def test_throughput_is_not_reported_for_the_compiling_step(finished_run):
    records = read_metrics(finished_run)
    assert records[0]["step"] == 1 and "tokens_per_second" not in records[0]
    assert all(r["tokens_per_second"] > 0 for r in records[1:])


def test_a_second_run_on_a_workdir_stops_at_once_and_a_stale_lock_does_not_block(tmp_path):
    from nemojax.train.workdir import WorkdirLock

    workdir = str(tmp_path / "w")
    first = train_cli(workdir, "--config.total_steps=100000")
    lock = os.path.join(workdir, "run.lock")
    deadline = time.time() + 120
    while not os.path.exists(lock) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    try:
        assert os.path.exists(lock), first.communicate()[0] if first.poll() is not None else "no lock"
        began = time.time()
        second = train_cli(workdir, "--config.total_steps=3")
        out, _ = second.communicate(timeout=120)
        assert second.returncode == 1, out
        assert f"train.py: error: --workdir {workdir}: another run holds it (pid {first.pid} on" in out, out
        assert "Traceback" not in out and time.time() - began < 60
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with open(lock) as f:
        assert json.load(f)["pid"] == first.pid  # left behind by the killed run
    with WorkdirLock(workdir):  # dead owner on this host: taken over
        with open(lock) as f:
            assert json.load(f)["pid"] == os.getpid()
    assert not os.path.exists(lock)


def test_an_unusable_workdir_is_one_line(tmp_path):
    from nemojax.train.trainer import Trainer
    from nemojax.train.workdir import WorkdirError

    (tmp_path / "file").write_text("")
    with pytest.raises(WorkdirError, match=f"--workdir {tmp_path}/file/w: cannot create it"):
        Trainer(micro(), str(tmp_path / "file" / "w"))


def test_seq_len_one_and_unknown_config_fields_are_one_line(tmp_path):
    from nemojax.train.trainer import Trainer

    with pytest.raises(ConfigError, match="`seq_len` = 1: must be >= 2"):
        Trainer(micro(seq_len=1), str(tmp_path / "w"))
    for flag, line in (("--config.foo=1", "train.py: error: --config.foo=1: the config has no field `foo`"),
                       ("--config.data.sorce=x", 'the config has no field `sorce` (Did you mean "source"?)')):
        proc = train_cli(tmp_path / "w", flag)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 1 and line in out and "Traceback" not in out, out


# ----- data --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, content, where", [
    ("bad.txt", b"fine line\nbad \xff byte\n", "bad.txt:2: not valid UTF-8 (byte 0xff at column 5)"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "bad.jsonl:2: not valid UTF-8 (byte 0xe9 at column 14)"),
])
def test_invalid_utf8_names_the_file_and_line(tmp_path, name, content, where):
    from nemojax.data.sources import DataError, read_documents
    from nemojax.evaluation import EvalError, read_choice_examples

    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/{where}")):
        read_documents(str(tmp_path / name), "text")
    if name.endswith(".jsonl"):
        with pytest.raises(EvalError, match=re.escape(f"{tmp_path}/{where}")):
            read_choice_examples(str(tmp_path / name))


def test_out_of_range_tokens_fail_before_any_step(tmp_path):
    from nemojax.data.sources import DataError
    from nemojax.train.trainer import Trainer

    tokens = np.random.default_rng(0).integers(0, 256, 2000).astype(np.int32)
    tokens[1500] = -3
    np.save(tmp_path / "t.npy", tokens)
    config = micro(**{"data.source": "tokens", "data.paths": (str(tmp_path / "t.npy"),)})
    with pytest.raises(DataError, match=r"t.npy: token -3 at offset 1500 is outside the model's vocabulary"):
        Trainer(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "checkpoints" / "1")


# ----- sampling and scoring options ------------------------------------------------------------------------
def test_sampling_and_scoring_options_are_checked():
    from nemojax.config import ModelConfig
    from nemojax.generate import GenerationError, check_sampling
    from nemojax.scoring import Scorer, ScoringError

    cfg = ModelConfig(vocab_size=64, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                      mamba_num_heads=2, mamba_head_dim=8, n_groups=1, ssm_state_size=8, intermediate_size=16)
    for options, message in (((0.7, 0, 0.0), "top_p = 0.0: must be in"), ((-1.0, 0, 1.0), "temperature = -1.0"),
                             ((1.0, -3, 1.0), "top_k = -3"), ((1.0, 65, 1.0), "top_k = 65: must be in \\[0, "
                                                                               "vocab_size = 64\\]")):
        with pytest.raises(GenerationError, match=message):
            check_sampling(cfg, *options)
    check_sampling(cfg, 0.0, 64, 1.0)
    for kwargs, message in ((dict(max_length=1), "max_length = 1: must be >= 2"),
                            (dict(max_length=0), "max_length = 0"), (dict(batch_size=0), "batch_size = 0")):
        with pytest.raises(ScoringError, match=message):
            Scorer(cfg, {}, **kwargs)


@pytest.mark.parametrize("flag, line", [("--max_length=1", "--max_length must be >= 2"),
                                        ("--batch_size=0", "--batch_size must be >= 1"),
                                        ("--top_p=0", "--top_p must be in (0, 1]")])
def test_eval_refuses_bad_options_at_once(tmp_path, flag, line):
    began = time.time()
    result = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), f"--checkpoint={tmp_path}",
                             "--tasks=perplexity", flag], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 1 and line in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert time.time() - began < 60


# ----- the converter -------------------------------------------------------------------------------------
def test_converter_permissions_leftovers_workdirs_and_sizes(finished_run, tmp_path):
    import argparse

    from nemojax.convert import main, parse_size

    assert parse_size("5G") == parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1234") == 1234
    for bad in ("5X", "", "-1GB", "G"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a size such as 5GB"):
            parse_size(bad)

    dst = tmp_path / "hf"
    stale = [tmp_path / ".hf.tmp-999999999-abc", tmp_path / ".hf.tmp-x1y2"]  # a dead pid; the old naming
    for d in stale:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    previous = os.umask(0o027)
    try:
        assert main(["orbax-to-hf", finished_run, str(dst), "--max-shard-size", "5G"]) == 0  # a workdir
    finally:
        os.umask(previous)
    assert (os.stat(dst).st_mode & 0o777) == 0o750
    assert not any(d.exists() for d in stale)
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    from nemojax.config import ModelConfig

    assert ModelConfig.from_hf(json.loads((dst / "config.json").read_text())).hybrid_override_pattern == "M*E-"


def test_converter_reports_damaged_sources_in_one_line(finished_run, tmp_path, capsys):
    from nemojax.convert import main

    src = tmp_path / "step"
    shutil.copytree(os.path.join(finished_run, "checkpoints", "6"), src)
    _truncate_largest_array_file(str(src))
    assert main(["orbax-to-hf", str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"nemojax-convert: error: {src}: cannot read its parameters " in err, err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["step"]

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{not json")
    assert main(["hf-to-orbax", str(hf), str(tmp_path / "o")]) == 1
    assert f"{hf}/config.json: not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["orbax-to-hf", str(src), str(tmp_path / "o2"), "--max-shard-size", "5X"])
    assert exited.value.code == 2
    assert "--max-shard-size: expected a size such as 5GB, 500MB, 2GiB or a byte count, got '5X'" in \
        capsys.readouterr().err
