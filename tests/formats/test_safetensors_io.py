"""safetensors I/O: round trips, dtype casts, atomic saves and errors that name the file."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lorakit.formats import safetensors_io as sio
from lorakit.formats.safetensors_io import SafetensorsFileError


def lora_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "lora_unet_x.lora_down.weight": torch.randn(4, 16, generator=g),
        "lora_unet_x.lora_up.weight": torch.randn(16, 4, generator=g),
        "lora_unet_x.alpha": torch.tensor(4.0),
        "steps": torch.tensor([3, 5], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }


def test_round_trip_keeps_values_shapes_and_metadata(tmp_path):
    path = tmp_path / "a.safetensors"
    tensors = lora_tensors()
    sio.save_file(tensors, path, {"ss_network_dim": "4", "note": "ü"})
    loaded, meta = sio.load_file(path)
    assert meta == {"ss_network_dim": "4", "note": "ü"}
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and loaded[k].shape == t.shape
        assert torch.equal(loaded[k], t)
    assert sio.read_metadata(path) == meta


def test_dtype_casts_floats_only_and_keeps_0d(tmp_path):
    path = tmp_path / "h.safetensors"
    sio.save_file(lora_tensors(), path, dtype=torch.float16)
    loaded, meta = sio.load_file(path)
    assert meta == {}
    assert loaded["lora_unet_x.lora_up.weight"].dtype == torch.float16
    assert loaded["lora_unet_x.alpha"].dtype == torch.float16 and loaded["lora_unet_x.alpha"].shape == ()
    assert loaded["lora_unet_x.alpha"].item() == 4.0
    assert loaded["steps"].dtype == torch.int64 and loaded["mask"].dtype == torch.bool


def test_non_contiguous_shared_and_grad_tensors_are_saved(tmp_path):
    base = torch.arange(12.0).reshape(3, 4).requires_grad_()
    tensors = {"t": base.t(), "a": base, "row": base[1], "same": base}
    path = tmp_path / "s.safetensors"
    sio.save_file(tensors, path)  # safetensors alone refuses shared, non-contiguous or grad tensors
    loaded, _ = sio.load_file(path)
    for k, t in tensors.items():
        assert torch.equal(loaded[k], t.detach())


def test_bad_metadata_names_the_key(tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(TypeError, match="ss_network_dim"):
        sio.save_file({"a": torch.ones(1)}, path, {"ss_network_dim": 4})
    with pytest.raises(TypeError, match="metadata key 3"):
        sio.save_file({"a": torch.ones(1)}, path, {3: "x"})
    assert not path.exists()


def test_bad_tensors_and_dtype_are_named(tmp_path):
    path = tmp_path / "b.safetensors"
    with pytest.raises(TypeError, match="'w'"):
        sio.save_file({"w": [1.0]}, path)
    with pytest.raises(ValueError, match="meta device"):
        sio.save_file({"w": torch.empty(2, device="meta")}, path)
    with pytest.raises(TypeError, match="floating torch.dtype"):
        sio.save_file({"w": torch.ones(2)}, path, dtype=torch.int8)


def test_save_creates_parent_folders_and_replaces(tmp_path):
    path = tmp_path / "deep" / "er" / "x.safetensors"
    sio.save_file({"a": torch.ones(2)}, path, {"v": "1"})
    sio.save_file({"a": torch.zeros(3)}, path, {"v": "2"})
    loaded, meta = sio.load_file(path)
    assert meta == {"v": "2"} and torch.equal(loaded["a"], torch.zeros(3))
    assert os.listdir(path.parent) == ["x.safetensors"]  # no temporary files left


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names open files through /proc")
@pytest.mark.parametrize("name", ["x.safetensors", "x.pt"])
def test_save_flushes_the_data_to_disk_before_the_rename_makes_it_visible(tmp_path, monkeypatch, name):
    """save_file and save_tensors fsync the file they wrote before os.replace gives it its name: a power cut
    after the rename never leaves an empty or partial file under the destination's name."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    sio.save_tensors({"a": torch.ones(2)}, tmp_path / name)
    renamed = [i for i, (what, _) in enumerate(events) if what == "replace"]
    assert len(renamed) == 1
    written = events[renamed[0]][1]
    assert ("fsync", written) in events[:renamed[0]]


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_save_leaves_old_file_and_no_temp(tmp_path, monkeypatch, exc):
    path = tmp_path / "x.safetensors"
    sio.save_file({"a": torch.ones(2)}, path, {"v": "old"})

    def write_half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise exc

    monkeypatch.setattr(sio.safetensors.torch, "save_file", write_half_then_fail)
    with pytest.raises(OSError if isinstance(exc, RuntimeError) else type(exc)):  # a write error names the file
        sio.save_file({"a": torch.zeros(5)}, path, {"v": "new"})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["x.safetensors"]
    assert sio.read_metadata(path) == {"v": "old"}


def test_save_to_a_folder_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        sio.save_file({"a": torch.ones(1)}, tmp_path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        sio.load_file(path)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        sio.read_metadata(path)


def _saved(tmp_path, name="t.safetensors"):
    path = tmp_path / name
    sio.save_file({"a": torch.arange(100.0), "b": torch.ones(3, 3)}, path, {"k": "v"})
    return path, path.read_bytes()


@pytest.mark.parametrize(
    "cut, expected",
    [(5, "too short"), (12, "header length"), (-1, "truncated: the header describes"), (-300, "truncated")],
)
def test_truncated_file_is_named(tmp_path, cut, expected):
    path, data = _saved(tmp_path)
    path.write_bytes(data[:cut])
    with pytest.raises(SafetensorsFileError, match=expected) as err:
        sio.load_file(path)
    assert str(path) in str(err.value)


def test_trailing_bytes_are_corrupt(tmp_path):
    path, data = _saved(tmp_path)
    path.write_bytes(data + b"\0" * 8)
    with pytest.raises(SafetensorsFileError, match="corrupt"):
        sio.load_file(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "g.safetensors"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(SafetensorsFileError, match="not a safetensors file") as err:
        sio.load_file(path)
    assert str(path) in str(err.value)


def test_header_that_is_not_json(tmp_path):
    path = tmp_path / "j.safetensors"
    body = b"{not json at all}"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(SafetensorsFileError, match="not JSON"):
        sio.read_metadata(path)


def test_corrupt_header_entry_names_tensor(tmp_path):
    path = tmp_path / "e.safetensors"
    body = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[8]}}'
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 8)
    with pytest.raises(SafetensorsFileError, match="'w'"):
        sio.load_file(path)


def test_unknown_dtype_is_wrapped_with_file_name(tmp_path):
    path = tmp_path / "d.safetensors"
    body = b'{"w":{"dtype":"XX","shape":[2],"data_offsets":[0,8]}}'
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 8)
    with pytest.raises(SafetensorsFileError, match="d.safetensors"):
        sio.load_file(path)


@pytest.mark.parametrize("how", ["torch.save", "pickle2", "pickle3", "pickle4", "pickle5"])
def test_pickle_checkpoint_is_recognised(tmp_path, how):
    """torch.save's zip archive, and pickles of every protocol torch.save's legacy format may write (2 to 5, magic
    bytes 80 02 .. 80 05), are named as pickle checkpoints."""
    path = tmp_path / "model.ckpt"
    sd = {"w": torch.ones(2)}
    if how == "torch.save":
        torch.save(sd, path)
    else:
        path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=int(how[-1])))
    with pytest.raises(SafetensorsFileError, match="pickle checkpoint") as err:
        sio.load_file(path)
    assert "model.ckpt" in str(err.value)


@pytest.mark.parametrize("header_bytes", [640, 896, 1152, 1408, 66176])
def test_header_lengths_that_begin_like_a_pickle_are_read(tmp_path, header_bytes):
    """A header length of 640 (or 896, 1152, 1408, mod 65536) is stored as 80 02 .. 80 05, pickle's magic bytes;
    such a file is still a safetensors file, as its header tells."""
    path = tmp_path / "h.safetensors"
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    pad = 0
    for _ in range(16):  # metadata padded until the header (aligned to 8 bytes) has the length asked for
        sio.save_file(tensors, path, metadata={"pad": "x" * pad})
        n = int.from_bytes(path.read_bytes()[:8], "little")
        if n == header_bytes:
            break
        pad = max(0, pad + header_bytes - n - (0 if n < header_bytes else 7))
    assert n == header_bytes and path.read_bytes()[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
    loaded, metadata = sio.load_file(path)
    assert torch.equal(loaded["w"], tensors["w"]) and sio.read_metadata(path) == metadata == {"pad": "x" * pad}


def test_read_metadata_reads_only_the_header(tmp_path, monkeypatch):
    path, _ = _saved(tmp_path)
    monkeypatch.setattr(sio.safetensors, "safe_open", None)  # would fail if tensors were opened
    assert sio.read_metadata(path) == {"k": "v"}


def test_load_uses_safe_open_memory_map(tmp_path, monkeypatch):
    path, _ = _saved(tmp_path)
    opened = []
    real = sio.safetensors.safe_open

    def spy(*args, **kwargs):
        opened.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(sio.safetensors, "safe_open", spy)
    tensors, _ = sio.load_file(path)
    assert opened == [str(path)] and torch.equal(tensors["a"], torch.arange(100.0))


def test_file_written_by_safetensors_itself_loads(tmp_path):
    path = tmp_path / "ref.safetensors"
    safetensors.torch.save_file({"x": torch.ones(2, 2)}, str(path))  # no metadata at all
    tensors, meta = sio.load_file(path)
    assert meta == {} and torch.equal(tensors["x"], torch.ones(2, 2))


def test_find_non_finite():
    tensors = {
        "ok": torch.ones(3),
        "nan": torch.tensor([1.0, float("nan")]),
        "inf": torch.tensor([float("-inf")], dtype=torch.float16),
        "int": torch.tensor([1, 2]),
        "alpha": torch.tensor(float("inf")),
    }
    assert sio.find_non_finite(tensors) == ["nan", "inf", "alpha"]
    assert sio.find_non_finite({"a": torch.zeros(2, 2)}) == []


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_find_non_finite_reads_float8_tensors(dtype, monkeypatch):
    """torch.isfinite has no float8 kernel; float8 tensors are scanned through float32, slice by slice, so a NaN
    (and e5m2's Inf) is found wherever it lies."""
    monkeypatch.setattr(sio, "_UPCAST_CHUNK", 4)  # several slices on a small tensor
    clean = torch.linspace(-2, 2, 10).to(dtype)
    nan = torch.linspace(-2, 2, 10)
    nan[9] = float("nan")
    tensors = {"clean": clean, "nan": nan.to(dtype), "alpha": torch.tensor(1.0)}
    if dtype == torch.float8_e5m2:
        inf = torch.linspace(-2, 2, 10)
        inf[5] = float("-inf")
        tensors["inf"] = inf.to(dtype)
    bad = ["nan", "inf"] if dtype == torch.float8_e5m2 else ["nan"]
    assert sio.find_non_finite(tensors) == bad


def test_a_failed_write_names_the_destination_not_the_temporary_file(tmp_path):
    """A full disk inside torch.save shows as "basic_ios::clear: iostream error" (a RuntimeError) with the temporary
    name; the error names the file being written and suggests the cause, and nothing is left behind."""
    from lorakit.formats.atomic import atomic_write, staging_folder

    def full_disk(tmp):
        open(tmp, "wb").write(b"partial")
        raise RuntimeError("basic_ios::clear: iostream error")

    target = tmp_path / "out.safetensors"
    with pytest.raises(OSError, match=r"out.safetensors: could not be written \(basic_ios::clear: iostream error\); "
                                      r"is the disk full"):
        atomic_write(target, full_disk)
    with pytest.raises(OSError, match=r"t-state: could not be written \(No space left on device\); is the disk"):
        with staging_folder(tmp_path / "t-state") as folder:
            raise OSError(28, "No space left on device", str(folder / "optimizer.pt"))
    assert list(tmp_path.iterdir()) == []


def test_temporaries_of_killed_writers_are_removed_and_those_of_running_ones_kept(tmp_path):
    import subprocess
    import sys

    from lorakit.formats.atomic import atomic_write, remove_stale_temporaries

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".t.safetensors.{gone}.0123abcd.tmp").write_bytes(b"x" * 10)
    (tmp_path / f".t-state.{gone}.0123abcd.tmp").mkdir()
    (tmp_path / f".t-state.{gone}.0123abcd.tmp" / "optimizer.pt").write_bytes(b"x")
    (tmp_path / "t.safetensors").write_bytes(b"x")
    removed = []

    def write(tmp):  # a running writer (this process) looks while its own temporary is open
        Path(tmp).write_bytes(b"x")
        removed.extend(remove_stale_temporaries(tmp_path))
        assert os.path.exists(tmp)

    atomic_write(tmp_path / "u.safetensors", write)
    assert len(removed) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors", "u.safetensors"]


def test_safetensors_own_errors_and_temporaries_stay_under_lorakits_names(tmp_path, monkeypatch):
    """safetensors >= 0.8 writes through a .tmpXXXXXX file of its own, with private permissions, and reports an
    I/O error as SafetensorError naming that file. Its temporary lies in a temporary folder of lorakit's (so the
    clean-up of a killed run finds it), the error names the destination and the cause, and the saved file has
    the permissions the umask gives."""
    import safetensors.torch

    from lorakit.formats import atomic
    from lorakit.formats.safetensors_io import save_file

    seen = []
    real = safetensors.torch.save_file

    def recording(tensors, path, metadata=None):
        seen.append(Path(path))
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", recording)
    target = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(2)}, target)
    stage = seen[0].parent
    assert stage.parent == tmp_path and atomic._TEMPORARY.match(stage.name) and not stage.exists()
    assert list(tmp_path.iterdir()) == [target]
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask

    def full_disk(tensors, path, metadata=None):
        Path(path).with_name(".tmpAbC123").write_bytes(b"partial")
        raise safetensors.SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) '
                                          f'at path "{Path(path).with_name(".tmpAbC123")}"')

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match=r"b.safetensors: could not be written \(No space left on device\); is the "
                                      r"disk full") as caught:
        save_file({"w": torch.ones(2)}, tmp_path / "b.safetensors")
    assert caught.value.errno == 28 and ".tmp" not in str(caught.value)
    assert list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_torch_file_save_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch, exc):
    """save_tensors under a .pt/.ckpt name (kohya's --save_model_as pt/ckpt) is atomic too."""
    path = tmp_path / "x.pt"
    sio.save_tensors({"a": torch.ones(2)}, path)

    def write_half_then_fail(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"half")
        raise exc

    monkeypatch.setattr(sio.torch, "save", write_half_then_fail)
    with pytest.raises((OSError, RuntimeError) if isinstance(exc, RuntimeError) else type(exc)):
        sio.save_tensors({"a": torch.zeros(5)}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["x.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
