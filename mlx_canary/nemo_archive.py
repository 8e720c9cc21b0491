"""Safe reading of NeMo ``.nemo`` archives: tar members, ``model_config.yaml`` and the torch checkpoint.

Nothing in an archive is executed. The tar is validated before anything is read (no absolute paths, ``..``,
links or device files) and members are read in memory, never extracted. ``model_weights.ckpt`` (a
``torch.save`` zip) is unpickled by an allow-listed unpickler that only knows ``collections.OrderedDict``,
torch's tensor-rebuild functions and the plain storage types; storages become numpy arrays backed by the
archive file itself (memory-mapped) where possible. torch is not needed.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import re
import shutil
import struct
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import yaml

from .errors import CanaryError

CONFIG_MEMBER = "model_config.yaml"
WEIGHTS_MEMBER = "model_weights.ckpt"
# canary-1b-v2 ships its timestamps model (a CTC aligner) under these names; artifacts its config names (its
# tokenizer) are ordinary members.
TIMESTAMPS_PREFIX = "timestamps_asr_model_"
ALIGNER_CONFIG_MEMBER = TIMESTAMPS_PREFIX + "config.yaml"
ALIGNER_WEIGHTS_MEMBER = TIMESTAMPS_PREFIX + "weights.ckpt"

# torch storage class name -> numpy dtype (little-endian); "bfloat16" is widened to float32 on read.
STORAGE_DTYPES = {
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": "<f8",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "<i1",
    "ByteStorage": "<u1",
    "BoolStorage": "|b1",
}

_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (skipped), name length, extra length
_ZIP_LOCAL_SIGNATURE = b"PK\x03\x04"


# ---------------------------------------------------------------------------------------------------------------
# torch checkpoint (zip + restricted pickle)


class _StorageType:
    """Stands in for ``torch.<X>Storage`` inside the pickle: only carries the type name."""

    __slots__ = ("name",)  # no __dict__: a BUILD opcode cannot hang other state on it

    def __init__(self, name: str):
        self.name = name


class _Storage:
    """A flat numpy array holding one torch storage."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


def _refuse(what: str) -> CanaryError:
    return CanaryError(
        f"refusing to load checkpoint: it references {what}, which is not a tensor type "
        "(the file may be malicious or not a plain PyTorch state dict)"
    )


def _check_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CanaryError(f"corrupt checkpoint: {what} is not an integer")
    return value


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_ignored: Any) -> np.ndarray:
    """numpy equivalent of ``torch._utils._rebuild_tensor(_v2)`` with bounds checks (as_strided reads raw
    memory, so every index must be proven inside the storage first)."""
    if not isinstance(storage, _Storage):
        raise CanaryError("corrupt checkpoint: tensor without a storage")
    if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride):
        raise CanaryError("corrupt checkpoint: bad tensor size/stride")
    offset = _check_int(storage_offset, "storage offset")
    size = tuple(_check_int(s, "tensor size") for s in size)
    stride = tuple(_check_int(s, "tensor stride") for s in stride)
    flat = storage.array
    if not isinstance(flat, np.ndarray) or flat.ndim != 1 or flat.dtype.kind not in "biuf":
        raise CanaryError("corrupt checkpoint: bad storage")
    if offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CanaryError("corrupt checkpoint: negative tensor size, stride or offset")
    numel = math.prod(size)
    if numel == 0:
        return np.zeros(size, dtype=flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.shape[0]:
        raise CanaryError("corrupt checkpoint: tensor extends past the end of its storage")

    contiguous, expected = True, 1
    for n, s in zip(reversed(size), reversed(stride)):
        if n != 1 and s != expected:
            contiguous = False
            break
        expected *= n
    if contiguous:
        # A view: for memory-mapped storages nothing is read until the data is used.
        return flat[offset : offset + numel].reshape(size)
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * flat.itemsize for s in stride), writeable=False
    )
    return np.array(view)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for ``data.pkl`` that resolves only the globals a torch state dict needs."""

    def __init__(self, file: io.BufferedIOBase, load_storage):
        super().__init__(file)
        self._load_storage = load_storage
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise _refuse(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CanaryError(f"corrupt checkpoint: unsupported persistent id {str(pid)[:80]!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or storage_type.name not in STORAGE_DTYPES:
            raise CanaryError("corrupt checkpoint: storage of an unknown type")
        if not isinstance(key, str):
            raise CanaryError("corrupt checkpoint: bad storage key")
        numel = _check_int(numel, "storage size")
        # Tensors that share a storage (tied weights) must share one array.
        if key not in self._storages:
            self._storages[key] = _Storage(self._load_storage(key, STORAGE_DTYPES[storage_type.name], numel))
        return self._storages[key]


class _BufferReader(io.RawIOBase):
    """A seekable read-only file over a uint8 numpy array (a memory map or bytes), without copying it."""

    def __init__(self, buffer: np.ndarray):
        super().__init__()
        self._buf = buffer
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._buf.shape[0]}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, out) -> int:
        view = memoryview(out).cast("B")
        chunk = self._buf[self._pos : self._pos + len(view)]
        view[: chunk.shape[0]] = chunk.data
        self._pos += chunk.shape[0]
        return chunk.shape[0]


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_torch_checkpoint(
    source: Union[str, os.PathLike, bytes, bytearray],
    *,
    offset: int = 0,
    size: Optional[int] = None,
) -> dict[str, np.ndarray]:
    """Read a ``torch.save``'d state dict (zip format) into numpy arrays without torch.

    ``source`` is a file path (the zip may start at ``offset`` and span ``size`` bytes, e.g. inside an
    uncompressed tar: it is memory-mapped, not read) or the file's bytes. Float tensors keep their dtype
    except bfloat16, which comes back as float32. Tensors sharing a storage stay views of one array.
    """
    if isinstance(source, (bytes, bytearray)):
        buffer = np.frombuffer(source, dtype=np.uint8)
    else:
        path = Path(source)
        total = path.stat().st_size
        if size is None:
            size = total - offset
        if size <= 0 or offset + size > total:
            raise CanaryError(f"corrupt checkpoint: {path} is truncated")
        # .view(np.ndarray): plain arrays for callers; the view keeps the mapping alive.
        buffer = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(size,)).view(np.ndarray)

    try:
        archive = zipfile.ZipFile(_BufferReader(buffer))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CanaryError(
            "model_weights.ckpt is not a PyTorch zip checkpoint (torch >= 1.6 format); "
            f"legacy or corrupt checkpoints are not supported ({exc})"
        ) from None

    with archive:
        pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CanaryError("corrupt checkpoint: expected exactly one data.pkl in model_weights.ckpt")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in archive.namelist():
            byteorder = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise CanaryError(f"corrupt checkpoint: unknown byte order {byteorder!r}")

        def load_storage(key: str, dtype: str, numel: int) -> np.ndarray:
            name = f"{prefix}data/{key}"
            try:
                info = archive.getinfo(name)
            except KeyError:
                raise CanaryError(f"corrupt checkpoint: storage {key!r} is missing") from None
            np_dtype = np.dtype("<u2" if dtype == "bfloat16" else dtype)
            if byteorder == "big":
                np_dtype = np_dtype.newbyteorder(">")
            nbytes = numel * np_dtype.itemsize
            if numel < 0 or info.file_size < nbytes:
                raise CanaryError(f"corrupt checkpoint: storage {key!r} is shorter than its {numel} elements")
            if info.header_offset < 0:
                raise CanaryError("corrupt checkpoint: bad zip entry offset")
            if info.compress_type == zipfile.ZIP_STORED:
                # torch writes STORED entries: the data sits in the file right after the local header.
                header = buffer[info.header_offset : info.header_offset + _ZIP_LOCAL_HEADER.size].tobytes()
                if len(header) != _ZIP_LOCAL_HEADER.size:
                    raise CanaryError("corrupt checkpoint: truncated zip entry")
                signature, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(header)
                if signature != _ZIP_LOCAL_SIGNATURE:
                    raise CanaryError("corrupt checkpoint: bad zip entry header")
                start = info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len
                if start + nbytes > buffer.shape[0]:
                    raise CanaryError(f"corrupt checkpoint: storage {key!r} is truncated")
                flat = buffer[start : start + nbytes].view(np_dtype)
            else:
                flat = np.frombuffer(archive.read(name)[:nbytes], dtype=np_dtype)
            if byteorder == "big":
                flat = flat.astype(np_dtype.newbyteorder("<"))
            if dtype == "bfloat16":
                flat = _bf16_to_f32(flat)
            return flat

        try:
            with archive.open(pickles[0]) as handle:
                state = _RestrictedUnpickler(handle, load_storage).load()
        except CanaryError:
            raise
        except Exception as exc:  # untrusted bytes: any failure means a bad file, never a bug to surface
            raise CanaryError(f"corrupt checkpoint: cannot unpickle data.pkl ({type(exc).__name__}: {exc})") from None

    if not isinstance(state, dict):
        raise CanaryError("model_weights.ckpt does not hold a state dict")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if bad:
        raise CanaryError(f"model_weights.ckpt is not a plain state dict (non-tensor entries: {bad[:5]})")
    return dict(state)


# ---------------------------------------------------------------------------------------------------------------
# .nemo tar


def _member_name(raw: str) -> str:
    name = raw
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def _validate_member(member: tarfile.TarInfo) -> None:
    raw = member.name
    if raw.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", raw):
        raise CanaryError(f"unsafe .nemo archive: member {raw!r} has an absolute path")
    if ".." in re.split(r"[/\\]", raw):
        raise CanaryError(f"unsafe .nemo archive: member {raw!r} points outside the archive ('..')")
    if member.issym() or member.islnk():
        raise CanaryError(f"unsafe .nemo archive: member {raw!r} is a link (to {member.linkname!r})")
    if member.ischr() or member.isblk() or member.isfifo():
        raise CanaryError(f"unsafe .nemo archive: member {raw!r} is a device or fifo")
    if not (member.isreg() or member.isdir()):
        raise CanaryError(f"unsafe .nemo archive: member {raw!r} has an unsupported type")


class NemoArchive:
    """An opened, validated ``.nemo`` file. Use as a context manager (or call ``close``)."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        if not self.path.exists():
            raise CanaryError(f"no such file: {self.path}")
        if self.path.is_dir():
            raise CanaryError(f"{self.path} is a directory, expected a .nemo file")
        self.compressed = False
        self._tar = self._open_tar()
        try:
            self.members = self._index()
        except BaseException:
            self._tar.close()
            raise

    def _open_tar(self) -> tarfile.TarFile:
        # NeMo >= 1.7 writes plain tar; older archives are gzipped.
        try:
            return tarfile.open(self.path, "r:")
        except (tarfile.TarError, OSError, EOFError):
            pass
        try:
            tar = tarfile.open(self.path, "r:gz")
        except (tarfile.TarError, OSError, EOFError):
            raise CanaryError(f"{self.path} is not a valid .nemo archive (neither a tar nor a gzipped tar)") from None
        self.compressed = True
        return tar

    def _index(self) -> dict[str, tarfile.TarInfo]:
        try:
            infos = self._tar.getmembers()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise CanaryError(f"{self.path} is not a valid .nemo archive (corrupt or truncated: {exc})") from None
        file_size = self.path.stat().st_size
        members: dict[str, tarfile.TarInfo] = {}
        for info in infos:
            _validate_member(info)
            if info.isdir():
                continue
            name = _member_name(info.name)
            if name in members:
                raise CanaryError(f"unsafe .nemo archive: member {info.name!r} appears twice")
            if not self.compressed and info.offset_data + info.size > file_size:
                raise CanaryError(f"{self.path} is not a valid .nemo archive (truncated inside {info.name!r})")
            members[name] = info
        # tarfile stops silently at a cut-off header; a complete tar ends with zero blocks after the last member.
        if not self.compressed and file_size - self._tar.offset < tarfile.BLOCKSIZE:
            raise CanaryError(f"{self.path} is not a valid .nemo archive (truncated: the end of the tar is missing)")
        if CONFIG_MEMBER not in members:
            raise CanaryError(f"{self.path} is not a valid .nemo archive: it has no {CONFIG_MEMBER}")
        return members

    def __enter__(self) -> "NemoArchive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._tar.close()

    @property
    def names(self) -> list[str]:
        """Member file names without the ``./`` prefix."""
        return list(self.members)

    @property
    def extras(self) -> list[str]:
        """The members of canary-1b-v2's timestamp CTC model (converted beside the main model)."""
        return [n for n in self.members if n.startswith(TIMESTAMPS_PREFIX)]

    @property
    def has_timestamps_model(self) -> bool:
        """NeMo restores the timestamps model when both its members are present (and ignores a lone one)."""
        return ALIGNER_CONFIG_MEMBER in self.members and ALIGNER_WEIGHTS_MEMBER in self.members

    def read(self, name: str) -> bytes:
        """The bytes of member ``name``."""
        info = self.members.get(_member_name(name))
        if info is None:
            raise CanaryError(f"{self.path.name} has no member {name!r}")
        try:
            handle = self._tar.extractfile(info)
            data = handle.read() if handle is not None else b""
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise CanaryError(f"{self.path} is not a valid .nemo archive (cannot read {name!r}: {exc})") from None
        if len(data) != info.size:
            raise CanaryError(f"{self.path} is not a valid .nemo archive (truncated inside {name!r})")
        return data

    def config(self) -> dict:
        """``model_config.yaml`` parsed with ``yaml.safe_load``."""
        try:
            cfg = yaml.safe_load(self.read(CONFIG_MEMBER))
        except yaml.YAMLError as exc:
            raise CanaryError(f"{CONFIG_MEMBER} in {self.path.name} is not valid YAML: {exc}") from None
        if not isinstance(cfg, dict):
            raise CanaryError(f"{CONFIG_MEMBER} in {self.path.name} is not a mapping")
        return cfg

    def resolve_artifact(self, ref: str) -> str:
        """Member name for a config reference like ``nemo:<uuid>_tokenizer.model`` (older configs hold a
        training path whose basename is the member)."""
        if not isinstance(ref, str) or not ref:
            raise CanaryError(f"bad artifact reference in {CONFIG_MEMBER}: {ref!r}")
        name = ref[len("nemo:") :] if ref.startswith("nemo:") else ref.replace("\\", "/").rsplit("/", 1)[-1]
        name = _member_name(name)
        if name not in self.members:
            raise CanaryError(f"{self.path.name} does not contain {name!r} (referenced as {ref!r} in {CONFIG_MEMBER})")
        return name

    def read_artifact(self, ref: str) -> bytes:
        return self.read(self.resolve_artifact(ref))

    def state_dict(self, name: str = WEIGHTS_MEMBER) -> dict[str, np.ndarray]:
        """The checkpoint as numpy arrays (see ``read_torch_checkpoint``)."""
        info = self.members.get(name)
        if info is None:
            raise CanaryError(f"{self.path} is not a valid .nemo archive: it has no {name}")
        if not self.compressed and not info.issparse():
            return read_torch_checkpoint(self.path, offset=info.offset_data, size=info.size)
        # Seeking inside a gzip stream is very slow: copy the member out once, then map the copy. The file
        # is unlinked right away on POSIX; the mapping keeps its data alive.
        with tempfile.NamedTemporaryFile(prefix="mlx-canary-ckpt-", suffix=".zip", delete=False) as tmp:
            try:
                handle = self._tar.extractfile(info)
                shutil.copyfileobj(handle, tmp, 16 << 20)
            except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                tmp.close()
                os.unlink(tmp.name)
                raise CanaryError(f"{self.path} is not a valid .nemo archive (cannot read {name}: {exc})") from None
        try:
            if os.path.getsize(tmp.name) != info.size:
                raise CanaryError(f"{self.path} is not a valid .nemo archive (truncated inside {name})")
            state = read_torch_checkpoint(tmp.name)
        finally:
            try:
                os.unlink(tmp.name)
            except OSError:  # Windows: still mapped; the temp dir is cleaned by the OS
                pass
        return state
