"""Tensor-by-tensor safetensors I/O for checkpoints larger than memory.

Reading: `CheckpointReader` maps every tensor name of a folder (one `model.safetensors`, or shards listed by
`model.safetensors.index.json`) to its file and byte range, from the headers alone, and reads one tensor at a
time with plain file reads. (No memory map: the pages of a mapped 13 GB file count in the process's resident
set while mapped, so the measured peak would grow with the checkpoint.)

Writing: `ShardWriter` appends tensors one at a time to the current shard's data file and starts a new shard
past `max_shard_bytes`; a finished shard gets its header written in front (the kernel copies the data, so it
never passes through this process). `finish()` names the shards as Hugging Face does
(`model-00001-of-00003.safetensors` + `model.safetensors.index.json`, or a single `model.safetensors`).
Memory never holds more than the tensor being written.

A full disk (ENOSPC, or EFBIG past a file size limit) raises `DiskFull` naming the file being written.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from compressor.errors import InputError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"  # = checkpoint_io.WEIGHTS_NAME (not imported: that module is the in-memory one)
_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
           "F8_E5M2": "float8_e5m2", "I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64",
           "BOOL": "bool"}


class DiskFull(InputError):
    """The disk (or the process's file size limit) ran out while writing; exit 2, nothing is left behind."""


def disk_full(e: OSError) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def raise_disk_full(e: OSError, path) -> None:
    if not e.filename:  # write() errors carry no file name; the CLI's one-line report reads it from here
        e.filename = str(path)
    raise DiskFull(f"disk full while writing {path} ({os.strerror(e.errno)}); free space or choose another --out "
                   "(nothing was kept)") from e


class CheckpointReader:
    """name -> (file, dtype, shape, byte range) for every tensor of a safetensors folder; `get(name)` reads one."""

    def __init__(self, folder: Path):
        from compressor.checkpoint_io import read_safetensors_header

        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(f"corrupt {index}: {e}") from None
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise InputError(f"{self.folder} has no safetensors weights")
        self.entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise InputError(f"{index} lists {name}, which is missing")
            header = read_safetensors_header(path)
            with open(path, "rb") as f:
                start = 8 + int.from_bytes(f.read(8), "little")
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                if v["dtype"] not in _DTYPES:
                    raise InputError(f"{path}: tensor {k} has dtype {v['dtype']}, which is not supported here")
                b, e = v["data_offsets"]
                self.entries[k] = (path, _DTYPES[v["dtype"]], tuple(v["shape"]), start + b, e - b)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def nbytes(self, name: str) -> int:
        return self.entries[name][4]

    def get(self, name: str):
        """Read one tensor (a fresh CPU tensor that owns its memory)."""
        import torch

        path, dtype, shape, offset, n = self.entries[name]
        buf = torch.empty(n, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(offset)
            got = f.readinto(buf.numpy())
        if got != n:
            raise InputError(f"{path}: tensor {name} is truncated ({got} of {n} bytes)")
        return buf.view(getattr(torch, dtype)).reshape(shape)


def _header(entries: list[tuple[str, str, tuple, int]]) -> bytes:
    """safetensors header for (name, ST dtype, shape, nbytes) in data order, space-padded to 8 bytes."""
    meta, off = {"__metadata__": {"format": "pt"}}, 0
    for name, st_dtype, shape, n in entries:
        meta[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


_ST = {v: k for k, v in _DTYPES.items()}


class ShardWriter:
    """Write tensors one by one into safetensors shards of at most `max_shard_bytes` (a single tensor larger
    than that gets a shard of its own)."""

    def __init__(self, folder: Path, max_shard_bytes: int = 2 << 30):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[tuple[Path, list[str]]] = []  # finished shards (temp names) and their tensors
        self.total = 0
        self._data = None  # open data file of the current shard
        self._entries: list[tuple[str, str, tuple, int]] = []
        self._size = 0
        self._names: set[str] = set()

    def _data_path(self) -> Path:
        return self.folder / f".shard-{len(self.shards) + 1:05d}.data"

    def add(self, name: str, tensor) -> None:
        import torch

        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        t = tensor.detach().contiguous()
        n = t.numel() * t.element_size()
        if self._entries and self._size + n > self.max_shard_bytes:
            self._close_shard()
        path = self._data_path()
        try:
            if self._data is None:
                self._data = open(path, "wb")
            self._data.write(t.reshape(-1).view(torch.uint8).numpy().data if n else b"")
        except OSError as e:
            if disk_full(e):
                raise_disk_full(e, self._final_hint())
            raise
        self._entries.append((name, _ST[str(t.dtype).removeprefix("torch.")], tuple(t.shape), n))
        self._names.add(name)
        self._size += n
        self.total += n

    def _final_hint(self) -> Path:
        return self.folder / f"model-{len(self.shards) + 1:05d}.safetensors"

    def _close_shard(self) -> None:
        data_path = self._data_path()
        final = self.folder / f".shard-{len(self.shards) + 1:05d}.safetensors"
        try:
            self._data.close()
            self._data = None
            with open(final, "wb") as out, open(data_path, "rb") as src:
                out.write(_header(self._entries))
                out.flush()  # the copy below writes at the descriptor's offset, past the header
                left = self._size
                while left > 0:  # in-kernel copy: the data never enters this process
                    n = os.copy_file_range(src.fileno(), out.fileno(), min(left, 1 << 30))
                    if n == 0:
                        raise OSError(errno.EIO, f"short copy of {data_path}")
                    left -= n
        except OSError as e:
            if disk_full(e):
                raise_disk_full(e, self._final_hint())
            raise
        data_path.unlink()
        self.shards.append((final, [e[0] for e in self._entries]))
        self._entries, self._size = [], 0

    def finish(self) -> list[Path]:
        """Close the last shard, give the shards their final names, write the index. -> the weight files."""
        if self._entries or not self.shards:
            if self._data is None:
                self._data = open(self._data_path(), "wb")
            self._close_shard()
        k = len(self.shards)
        names = [SINGLE_NAME] if k == 1 else [f"model-{i:05d}-of-{k:05d}.safetensors" for i in range(1, k + 1)]
        files = []
        for (tmp, _), name in zip(self.shards, names):
            os.replace(tmp, self.folder / name)
            files.append(self.folder / name)
        if k > 1:
            weight_map = {t: name for (_, tensors), name in zip(self.shards, names) for t in tensors}
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            try:
                (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            except OSError as e:
                if disk_full(e):
                    raise_disk_full(e, self.folder / INDEX_NAME)
                raise
        return files
