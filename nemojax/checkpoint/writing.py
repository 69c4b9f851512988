"""Writing checkpoints safely: a staging directory renamed into place only when complete, and safetensors
shards streamed tensor by tensor (the converter's output side)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator

import ml_dtypes
import numpy as np

from nemojax.checkpoint.hf import INDEX_FILE, SINGLE_FILE, CheckpointError

SAFETENSORS_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16),
                      "F16": np.dtype(np.float16)}  # what parameters are stored in
# ... and what a quantized export also writes (modelopt.py): FP8 weights and NVFP4 scales, packed E2M1.
_SAFETENSORS_CODE = {**{dtype: code for code, dtype in SAFETENSORS_DTYPES.items()},
                     np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3", np.dtype(np.uint8): "U8"}


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a lock's or a staging directory's owner)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def staged_output(dst: str, force: bool) -> Iterator[str]:
    """A temporary directory next to `dst`, renamed to `dst` when the block succeeds, removed if not.

    Leftovers of a conversion that was killed (`.DST.tmp-*` whose process is gone) are removed first; the
    result gets the permissions a new directory would (0777 less the umask), not mkdtemp's 0700.
    """
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not force:
        raise FileExistsError(f"{dst} exists; pass --force to replace it")
    parent = os.path.dirname(dst)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot create its directory ({e.strerror})") from None
    _remove_stale_staging(parent, os.path.basename(dst))
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-{os.getpid()}-", dir=parent)
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot write in {parent} ({e.strerror})") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    old = None
    try:
        yield tmp
        if os.path.exists(dst):  # --force: the old one is moved aside, deleted only once the new one is in place
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
            os.rename(dst, os.path.join(old, "previous"))
        os.rename(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old and os.path.exists(dst):
            shutil.rmtree(old, ignore_errors=True)


def _remove_stale_staging(parent: str, name: str) -> None:
    """Remove `.NAME.tmp-PID-*` directories whose converting process no longer runs."""
    for entry in os.listdir(parent):
        prefix = f".{name}.tmp-"
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix):].split("-")[0]
        if pid.isdigit() and process_alive(int(pid)):
            continue  # another conversion to the same place is under way
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


class StreamingShards:
    """Writes safetensors shards tensor by tensor: every shard's header (names, dtypes, shapes, offsets) is
    planned from the name table before any data, so no shard is ever held in memory. Shards are named like
    transformers' (`model-00001-of-00003.safetensors`, with an index) or `model.safetensors` when one."""

    def __init__(self, directory: str, tensors: list[tuple[str, np.dtype, tuple[int, ...]]], max_bytes: int):
        self.shards: list[list[tuple[str, np.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for name, dtype, shape in tensors:
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if self.shards[-1] and size + nbytes > max_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, dtype, shape))
            size += nbytes
        count = len(self.shards)
        self.names = [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                                                       for i in range(count)]
        self.directory = directory
        self.order = [(i, name, dtype, shape) for i, shard in enumerate(self.shards) for name, dtype, shape in shard]
        self.position = 0
        self.file = None
        self.total = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for _, d, s in tensors)

    def _open(self, index: int) -> None:
        if self.file:
            self.file.close()
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in self.shards[index]:
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": _SAFETENSORS_CODE[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.file = open(os.path.join(self.directory, self.names[index]), "wb")
        self.file.write(len(encoded).to_bytes(8, "little") + encoded)

    def write(self, name: str, array: np.ndarray) -> None:
        index, planned, dtype, shape = self.order[self.position]
        if (name, np.dtype(array.dtype), tuple(array.shape)) != (planned, dtype, tuple(shape)):
            raise CheckpointError(f"tensor {name} {array.dtype}{list(array.shape)} does not match the planned "
                                  f"{planned} {dtype}{list(shape)}")
        if self.position == 0 or self.order[self.position - 1][0] != index:
            self._open(index)
        np.ascontiguousarray(array).tofile(self.file)  # raw bytes, without another copy
        self.position += 1

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.position != len(self.order):
            raise CheckpointError(f"{self.position} of {len(self.order)} planned tensors were written")
        if len(self.names) > 1:
            weight_map = {name: self.names[i] for i, name, _, _ in self.order}
            with open(os.path.join(self.directory, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)
