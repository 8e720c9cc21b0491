"""Tests for mlx_canary.nemo_archive: tar validation, the allow-listed checkpoint unpickler, corrupt inputs."""

from __future__ import annotations

import collections
import gzip
import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mlx_canary.errors import CanaryError
from mlx_canary.nemo_archive import NemoArchive, read_torch_checkpoint

CONFIG_YAML = b"sample_rate: 16000\nprompt_format: canary2\ntokenizer:\n  type: agg\n"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_nemo(path: Path, members: dict, mode: str = "w:") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            _add(tar, name, data)
    return path


def torch_checkpoint(state) -> bytes:
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def torch_zip(pickle_bytes: bytes, storages: dict | None = None) -> bytes:
    """A torch-style checkpoint zip with a hand-made data.pkl."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


def malicious_pickle(module: str, name: str, argument: str) -> bytes:
    """PROTO 2; GLOBAL module name; BINUNICODE argument; TUPLE1; REDUCE; STOP."""
    arg = argument.encode()
    return (
        b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n"
        + b"X" + len(arg).to_bytes(4, "little") + arg + b"\x85R."
    )


# ---------------------------------------------------------------------------------------------------------------
# checkpoint reading


def test_reads_torch_state_dict_exactly():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    state = collections.OrderedDict(
        f32=torch.randn(3, 4, generator=g),
        f16=torch.randn(5, generator=g).half(),
        bf16=torch.randn(2, 3, generator=g).bfloat16(),
        f64=torch.randn(2, generator=g).double(),
        i64=torch.tensor(7),
        i32=torch.arange(6, dtype=torch.int32).reshape(2, 3),
        i16=torch.tensor([1, -2], dtype=torch.int16),
        i8=torch.tensor([-3], dtype=torch.int8),
        u8=torch.tensor([250], dtype=torch.uint8),
        flag=torch.tensor([True, False]),
        transposed=torch.randn(4, 3, generator=g).t(),
        sliced=torch.arange(20.0)[5:11].reshape(2, 3),
        empty=torch.zeros(0, 5),
        conv=torch.randn(8, 1, 3, 3, generator=g),
    )
    state["tied"] = state["f32"]
    state._metadata = collections.OrderedDict({"": {"version": 1}})
    out = read_torch_checkpoint(torch_checkpoint(state))
    assert list(out) == list(state)
    for key, tensor in state.items():
        expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        assert out[key].dtype == expected.dtype, key
        assert out[key].shape == expected.shape, key
        np.testing.assert_array_equal(out[key], expected, err_msg=key)
    # tied tensors share one storage, as in NeMo's tied embedding / head
    assert np.shares_memory(out["f32"], out["tied"])


def test_reads_checkpoint_from_file_memory_mapped(tmp_path):
    torch = pytest.importorskip("torch")
    state = {"w": torch.randn(4, 5), "b": torch.randn(5)}
    path = tmp_path / "w.ckpt"
    path.write_bytes(b"x" * 100 + torch_checkpoint(state) + b"tail")
    out = read_torch_checkpoint(path, offset=100, size=path.stat().st_size - 104)
    np.testing.assert_array_equal(out["w"], state["w"].numpy())
    assert not out["w"].flags.writeable  # a view of the mapped file: never written through


@pytest.mark.parametrize(
    "module,name",
    [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("subprocess", "call"),
     ("torch", "load"), ("torch._utils", "_rebuild_parameter"), ("numpy.core.multiarray", "_reconstruct")],
)
def test_refuses_non_tensor_globals(tmp_path, module, name):
    marker = tmp_path / "pwned"
    blob = torch_zip(malicious_pickle(module, name, f"touch {marker}"))
    with pytest.raises(CanaryError, match=rf"references {module}\.{name}, which is not a tensor type"):
        read_torch_checkpoint(blob)
    assert not marker.exists()


def test_refuses_protocol4_stack_global(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    blob = torch_zip(pickle.dumps(Evil(), protocol=4))
    with pytest.raises(CanaryError, match=r"system, which is not a tensor type"):
        read_torch_checkpoint(blob)
    assert not marker.exists()


def _crafted_tensor_pickle(size: tuple, stride: tuple, offset: int = 0, numel: int = 4) -> bytes:
    """A data.pkl whose tensor claims ``size``/``stride`` over a ``numel``-element float storage."""
    torch = pytest.importorskip("torch")
    from torch._utils import _rebuild_tensor_v2

    class StorageRef:
        pass

    class Tensor:
        def __reduce__(self):
            return (_rebuild_tensor_v2, (StorageRef(), offset, size, stride, False, collections.OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, StorageRef):
                return ("storage", torch.FloatStorage, "0", "cpu", numel)
            return None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(collections.OrderedDict(w=Tensor()))
    return buf.getvalue()


def test_crafted_tensor_within_bounds_reads():
    data = np.arange(4, dtype="<f4").tobytes()
    out = read_torch_checkpoint(torch_zip(_crafted_tensor_pickle((2, 2), (1, 2)), {"0": data}))
    np.testing.assert_array_equal(out["w"], np.array([[0.0, 2.0], [1.0, 3.0]], dtype=np.float32))


@pytest.mark.parametrize(
    "size,stride,offset", [((1000,), (1,), 0), ((2, 2), (1, 2), 1), ((2,), (-1,), 1), ((4,), (1,), -1)]
)
def test_out_of_bounds_tensor_is_refused(size, stride, offset):
    data = np.arange(4, dtype="<f4").tobytes()
    with pytest.raises(CanaryError, match="corrupt checkpoint"):
        read_torch_checkpoint(torch_zip(_crafted_tensor_pickle(size, stride, offset), {"0": data}))


def test_storage_shorter_than_declared_is_refused():
    with pytest.raises(CanaryError, match="shorter than"):
        read_torch_checkpoint(torch_zip(_crafted_tensor_pickle((4,), (1,)), {"0": b"\0" * 8}))


def test_build_cannot_alter_allowed_objects():
    """BUILD on an allowed global (a storage type) cannot give it new state (e.g. an object dtype)."""
    evil = b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeX\x01\x00\x00\x00Osb."
    with pytest.raises(CanaryError, match="corrupt checkpoint"):
        read_torch_checkpoint(torch_zip(evil))


def test_missing_storage_and_garbage_pickle():
    with pytest.raises(CanaryError, match="missing"):
        read_torch_checkpoint(torch_zip(_crafted_tensor_pickle((4,), (1,))))
    with pytest.raises(CanaryError, match="corrupt checkpoint"):
        read_torch_checkpoint(torch_zip(b"\x80\x02garbage"))


def test_non_state_dict_is_refused():
    with pytest.raises(CanaryError, match="state dict"):
        read_torch_checkpoint(torch_zip(pickle.dumps([1, 2, 3], protocol=2)))
    with pytest.raises(CanaryError, match="not a plain state dict"):
        read_torch_checkpoint(torch_zip(pickle.dumps({"a": 1}, protocol=2)))


def test_legacy_or_garbage_checkpoint_is_refused():
    with pytest.raises(CanaryError, match="not a PyTorch zip checkpoint"):
        read_torch_checkpoint(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.")  # legacy torch magic pickle


# ---------------------------------------------------------------------------------------------------------------
# the tar archive


@pytest.fixture
def good_members():
    torch = pytest.importorskip("torch")
    return {
        "./model_config.yaml": CONFIG_YAML,
        "./model_weights.ckpt": torch_checkpoint({"w": torch.arange(6.0).reshape(2, 3)}),
        "./abc123_tokenizer.model": b"spm-bytes",
    }


@pytest.mark.parametrize("mode", ["w:", "w:gz"])
def test_reads_plain_and_gzipped_archives(tmp_path, good_members, mode):
    path = write_nemo(tmp_path / "m.nemo", good_members, mode)
    with NemoArchive(path) as archive:
        assert archive.compressed == (mode == "w:gz")
        assert set(archive.names) == {"model_config.yaml", "model_weights.ckpt", "abc123_tokenizer.model"}
        assert archive.config()["prompt_format"] == "canary2"
        assert archive.read_artifact("nemo:abc123_tokenizer.model") == b"spm-bytes"
        # older configs hold a stale training path whose basename is the member
        assert archive.read_artifact("/data/run/tokenizers/abc123_tokenizer.model") == b"spm-bytes"
        np.testing.assert_array_equal(archive.state_dict()["w"], np.arange(6.0, dtype=np.float32).reshape(2, 3))
        assert archive.extras == []


def test_timestamp_model_members_are_reported(tmp_path, good_members):
    members = dict(good_members)
    members["./timestamps_asr_model_config.yaml"] = b"a: 1\n"
    members["./timestamps_asr_model_weights.ckpt"] = b"x"
    with NemoArchive(write_nemo(tmp_path / "v2.nemo", members)) as archive:
        assert archive.has_timestamps_model
        assert sorted(archive.extras) == ["timestamps_asr_model_config.yaml", "timestamps_asr_model_weights.ckpt"]


def test_missing_artifact_is_named(tmp_path, good_members):
    with NemoArchive(write_nemo(tmp_path / "m.nemo", good_members)) as archive:
        with pytest.raises(CanaryError, match="nope_tokenizer.model"):
            archive.read_artifact("nemo:nope_tokenizer.model")


def _evil_archive(path: Path, kind: str) -> str:
    """Write an archive with one unsafe member; return the member name the error must mention."""
    with tarfile.open(path, "w:") as tar:
        _add(tar, "./model_config.yaml", CONFIG_YAML)
        if kind == "dotdot":
            _add(tar, "../evil", b"owned")
            return "../evil"
        if kind == "nested_dotdot":
            _add(tar, "./sub/../../evil", b"owned")
            return "./sub/../../evil"
        if kind == "absolute":
            _add(tar, "/tmp/evil", b"owned")
            return "/tmp/evil"
        info = tarfile.TarInfo("./model_weights.ckpt")
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "./model_config.yaml"
        elif kind == "device":
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        elif kind == "fifo":
            info.type = tarfile.FIFOTYPE
        tar.addfile(info)
        return "./model_weights.ckpt"


@pytest.mark.parametrize("kind", ["dotdot", "nested_dotdot", "absolute", "symlink", "hardlink", "device", "fifo"])
def test_unsafe_members_are_refused(tmp_path, kind):
    work = tmp_path / "work"
    work.mkdir()
    member = _evil_archive(work / "evil.nemo", kind)
    with pytest.raises(CanaryError, match="unsafe .nemo archive") as err:
        NemoArchive(work / "evil.nemo")
    assert member in str(err.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["evil.nemo", "work"]
    assert not Path("/tmp/evil").exists() or kind != "absolute"


def test_duplicate_member_is_refused(tmp_path, good_members):
    with tarfile.open(tmp_path / "dup.nemo", "w:") as tar:
        for name, data in good_members.items():
            _add(tar, name, data)
        _add(tar, "model_config.yaml", b"other: 1\n")
    with pytest.raises(CanaryError, match="appears twice"):
        NemoArchive(tmp_path / "dup.nemo")


@pytest.mark.parametrize("mode", ["w:", "w:gz"])
@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_truncated_archive_gives_a_clear_error(tmp_path, good_members, mode, fraction):
    full_path = write_nemo(tmp_path / "full.nemo", good_members, mode)
    full = full_path.read_bytes()
    if mode == "w:":
        # cut inside the members, not in the zero padding a tar ends with
        with tarfile.open(full_path) as tar:
            end = max(m.offset_data + m.size for m in tar.getmembers())
    else:
        end = len(full)
    path = tmp_path / "cut.nemo"
    path.write_bytes(full[: int(end * fraction)])
    with pytest.raises(CanaryError, match="not a valid .nemo archive|corrupt"):
        with NemoArchive(path) as archive:
            archive.state_dict()
            archive.config()


@pytest.mark.parametrize("content", [b"", b"hello world" * 100, gzip.compress(b"not a tar at all" * 50)])
def test_not_an_archive(tmp_path, content):
    path = tmp_path / "bad.nemo"
    path.write_bytes(content)
    with pytest.raises(CanaryError, match="not a valid .nemo archive"):
        NemoArchive(path)


def test_archive_without_config_or_weights(tmp_path):
    with pytest.raises(CanaryError, match="no model_config.yaml"):
        NemoArchive(write_nemo(tmp_path / "a.nemo", {"./x.txt": b"1"}))
    with NemoArchive(write_nemo(tmp_path / "b.nemo", {"./model_config.yaml": CONFIG_YAML})) as archive:
        with pytest.raises(CanaryError, match="no model_weights.ckpt"):
            archive.state_dict()


def test_corrupt_checkpoint_inside_archive(tmp_path):
    path = write_nemo(tmp_path / "c.nemo", {"./model_config.yaml": CONFIG_YAML, "./model_weights.ckpt": b"PK" * 50})
    with NemoArchive(path) as archive, pytest.raises(CanaryError, match="not a PyTorch zip checkpoint"):
        archive.state_dict()


def test_bad_yaml_and_missing_file(tmp_path):
    path = write_nemo(tmp_path / "y.nemo", {"./model_config.yaml": b"a: [1, 2\n"})
    with NemoArchive(path) as archive, pytest.raises(CanaryError, match="not valid YAML"):
        archive.config()
    # yaml.safe_load: python tags are not constructed
    path = write_nemo(tmp_path / "t.nemo", {"./model_config.yaml": b"a: !!python/object/apply:os.system ['true']\n"})
    with NemoArchive(path) as archive, pytest.raises(CanaryError, match="not valid YAML"):
        archive.config()
    with pytest.raises(CanaryError, match="no such file"):
        NemoArchive(tmp_path / "missing.nemo")
    with pytest.raises(CanaryError, match="is a directory"):
        NemoArchive(tmp_path)
