"""kohya's sshs hashes and A1111's file hashes, checked by hand and by an independent re-implementation."""

from __future__ import annotations

import hashlib
import struct

import pytest
import safetensors.torch
import torch

from lorakit.formats import hashes
from lorakit.formats.safetensors_io import prepare_tensors, read_metadata, save_file

EMPTY_SHA256_8 = "e3b0c442"  # sha256(b"")[:8]: the legacy hash of any file under 1 MiB


def reference_sshs(tensors, metadata):
    """Written from the description in kohya sd-scripts library/train_util.py, not from lorakit:

    serialise the tensors with safetensors.torch.save and only the "ss_*" metadata; the model hash
    is sha256 of everything after the 8-byte length and the header; the legacy hash is the first
    8 hex of sha256 of the 64 KiB that start 1 MiB into the serialised bytes.
    """
    data = safetensors.torch.save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    (n,) = struct.unpack("<Q", data[:8])
    model = hashlib.sha256(data[8 + n :]).hexdigest()
    legacy = hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model, legacy


def test_hand_checked_single_tensor():
    # The data section is the raw little-endian float32 bytes of [1.0, 2.0]: 0000803f 00000040.
    tensors = {"a": torch.tensor([1.0, 2.0])}
    data = safetensors.torch.save(tensors, {})
    (n,) = struct.unpack("<Q", data[:8])
    assert data[8 + n :] == bytes.fromhex("0000803f00000040")
    expected = "b9c80b5adeca450753a16950c3cc655d271f7bef7a485bc83f112b72fef21d37"
    assert hashlib.sha256(data[8 + n :]).hexdigest() == expected
    assert hashes.sshs_hashes(tensors, {}) == (expected, EMPTY_SHA256_8)


def test_hand_checked_tensor_order():
    # safetensors lays data out by dtype size (largest first), then by name: F32 "b" before F16 "a".
    tensors = {"a": torch.tensor([1.0], dtype=torch.float16), "b": torch.tensor([3.0])}
    model, legacy = hashes.sshs_hashes(tensors, {"ss_x": "1", "modelspec.title": "t"})
    assert model == hashlib.sha256(bytes.fromhex("00004040" + "003c")).hexdigest()
    assert legacy == EMPTY_SHA256_8


def big_lora():
    g = torch.Generator().manual_seed(1)
    return {
        "lora_unet_a.lora_down.weight": torch.randn(8, 320, generator=g),
        "lora_unet_a.lora_up.weight": torch.randn(320, 8, generator=g),
        "lora_unet_a.alpha": torch.tensor(8.0),
        "lora_te_b.lora_down.weight": torch.randn(8, 40000, generator=g),  # pushes the file past 1 MiB
        "lora_te_b.lora_up.weight": torch.randn(768, 8, generator=g),
        "lora_te_b.alpha": torch.tensor(4.0),
    }


META = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "8",
    "ss_tag_frequency": '{"x": {"cat": 3}}',
    "modelspec.title": "my lora",
    "sshs_model_hash": "stale",
}


@pytest.mark.parametrize("metadata", [{}, META, {"ss_" + str(i): "v" * i for i in range(50)}])
def test_matches_reference_over_one_mib(metadata):
    tensors = big_lora()
    model, legacy = hashes.sshs_hashes(tensors, metadata)
    assert (model, legacy) == reference_sshs(tensors, metadata)
    assert legacy != EMPTY_SHA256_8  # the file is past 1 MiB, so real bytes were hashed


def test_only_ss_metadata_enters_the_hash():
    tensors = big_lora()
    base = hashes.sshs_hashes(tensors, {"ss_a": "1"})
    assert hashes.sshs_hashes(tensors, {"ss_a": "1", "modelspec.title": "x", "other": "y"}) == base
    changed = hashes.sshs_hashes(tensors, {"ss_a": "1", "ss_b": "2"})
    assert changed[0] == base[0]  # model hash covers tensor data only
    assert changed[1] != base[1]  # a longer header shifts the bytes at 1 MiB


def test_no_metadata_hashes_as_an_empty_ss_dict():
    """kohya serialises with a dict of the ss_* keys, empty or not, so no metadata at all is an empty
    __metadata__ in the header (safetensors writes none for None): over 1 MiB that header decides the legacy hash."""
    tensors = big_lora()
    assert hashes.sshs_hashes(tensors) == hashes.sshs_hashes(tensors, None) == reference_sshs(tensors, {})
    assert hashes.sshs_hashes(tensors)[1] != EMPTY_SHA256_8


def test_add_hashes_returns_a_copy_with_both_keys():
    tensors = big_lora()
    meta = dict(META)
    out = hashes.add_hashes(tensors, meta)
    assert meta == META  # input untouched
    assert out.keys() == META.keys() | {"sshs_model_hash", "sshs_legacy_hash"}
    assert (out["sshs_model_hash"], out["sshs_legacy_hash"]) == reference_sshs(tensors, META)
    assert hashes.add_hashes(tensors, None).keys() == {"sshs_model_hash", "sshs_legacy_hash"}


def test_saved_file_agrees_with_a1111(tmp_path):
    # A1111 hashes a LoRA file's tensor data when sshs_model_hash is missing; the two must agree.
    tensors = prepare_tensors(big_lora(), torch.float16)  # hash what is saved: the cast tensors
    path = tmp_path / "l.safetensors"
    save_file(tensors, path, hashes.add_hashes(tensors, META))
    meta = read_metadata(path)
    assert meta["sshs_model_hash"] == hashes.file_addnet_hash(path)
    assert hashes.lora_short_hash(path) == meta["sshs_model_hash"][:12]
    # Without the key, A1111 computes the same hash from the file.
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, bare, {"ss_network_dim": "8"})
    assert hashes.lora_short_hash(bare) == meta["sshs_model_hash"][:12]


def test_lora_short_hash_is_the_files_sshs_model_hash_when_it_has_one(tmp_path):
    """A1111 (extensions-builtin/Lora/network.py NetworkOnDisk) takes sshs_model_hash from the metadata as it is and
    hashes the file only without it: a file whose stored hash is not that of its data shows the stored one."""
    path = tmp_path / "l.safetensors"
    stored = "0123456789abcdef" * 4
    save_file({"a": torch.ones(2)}, path, {"sshs_model_hash": stored})
    assert hashes.file_addnet_hash(path) != stored
    assert hashes.lora_short_hash(path) == "0123456789ab"


def test_file_hashes_by_hashlib(tmp_path):
    path = tmp_path / "f.safetensors"
    save_file(big_lora(), path, {"modelspec.title": "x"})
    data = path.read_bytes()
    full = hashlib.sha256(data).hexdigest()
    assert hashes.file_sha256(path) == full
    assert hashes.autov2(path) == full[:10]
    assert hashes.file_legacy_hash(path) == hashlib.sha256(data[1048576 : 1048576 + 65536]).hexdigest()[:8]
    (n,) = struct.unpack("<Q", data[:8])
    assert hashes.file_addnet_hash(path) == hashlib.sha256(data[8 + n :]).hexdigest()


def test_non_string_metadata_is_refused():
    with pytest.raises(TypeError, match="ss_network_dim"):
        hashes.add_hashes({"a": torch.ones(1)}, {"ss_network_dim": 8})
