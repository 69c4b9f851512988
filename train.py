"""Train or fine-tune a Nemotron hybrid.

    python train.py --config configs/tiny.py --workdir /tmp/tiny [--config.total_steps=200 --config.seed=1]

Re-running the same command resumes from the latest checkpoint in --workdir.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl and tensorboard logs go here")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    import jax

    if _multi_process_environment():
        jax.distributed.initialize(**_process_arguments())
    from nemojax.checkpoint.hf import CheckpointError
    from nemojax.config import ConfigError
    from nemojax.data.sources import DataError
    from nemojax.train.trainer import Preempted, Trainer, TrainingError
    from nemojax.train.workdir import WorkdirError

    try:
        Trainer(_CONFIG.value, _WORKDIR.value).run()
    except Preempted:
        sys.exit(143)
    except (ConfigError, DataError, CheckpointError, TrainingError, WorkdirError, FileNotFoundError) as e:
        # Bad input or a stopped run: the message names the field, file or step; a traceback adds nothing.
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a config override that names no field (`--config.totl_steps=5`) reported in
    one line instead of ml_collections' traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except AttributeError as e:
        import re

        field = (re.findall(r"[A-Za-z_][A-Za-z0-9_]*", str(e)) or ["?"])[0]
        hint = next(iter(re.findall(r'Did you mean "[^"]+"', str(e))), "")
        hint = f"{hint}?" if hint else ""
        override = next((a for a in argv if a.startswith("--config.") and f".{field}" in a.split("=")[0]), field)
        print(f"train.py: error: {override}: the config has no field `{field}`" + (f" ({hint})" if hint else ""),
              file=sys.stderr)
        sys.exit(1)


def _process_arguments() -> dict[str, int]:
    """An explicit coordinator's process count and this process's index, from JAX_NUM_PROCESSES and
    JAX_PROCESS_ID (JAX reads only the address itself); SLURM and TPU pods detect their own."""
    import os

    names = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
    return {arg: int(os.environ[env]) for arg, env in names.items() if env in os.environ}


def _multi_process_environment() -> bool:
    """True on a launcher that starts one process per host (SLURM, TPU pod, explicit coordinator)."""
    import os

    return any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES")) or int(
        os.environ.get("SLURM_NTASKS", "1")) > 1


if __name__ == "__main__":
    from nemojax.hostmem import reexec_with_huge_pages

    reexec_with_huge_pages()  # before JAX starts: XLA:CPU's per-step scratch on huge pages
    app.run(main, flags_parser=parse_flags)
