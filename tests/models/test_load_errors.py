"""Bad input to the model loader: each error names the file and what was found versus expected."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lorakit.formats.checkpoint_file import CheckpointFileError  # noqa: E402
from lorakit.formats.safetensors_io import load_file, save_file  # noqa: E402
from lorakit.models.detect import ModelKindError  # noqa: E402
from lorakit.models.load import load_model  # noqa: E402
from lorakit.models.save import save_checkpoint  # noqa: E402

from .test_load_save import _model  # noqa: E402


@pytest.fixture(scope="module")
def sd_tensors(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "ok.safetensors"
    save_checkpoint(_model("tiny-sd"), path, dtype=None)
    return load_file(path)[0]


def _write(tmp_path, tensors, name="m.safetensors"):
    path = tmp_path / name
    save_file(tensors, path)
    return path


def test_truncated_file(sd_tensors, tmp_path):
    path = _write(tmp_path, sd_tensors)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFileError, match=rf"{path.name}.*truncated"):
        load_model(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointFileError, match="junk.safetensors"):
        load_model(path)


def test_corrupt_ckpt(tmp_path):
    path = tmp_path / "junk.ckpt"
    path.write_bytes(b"PK\x03\x04" + os.urandom(200))
    with pytest.raises(CheckpointFileError, match="junk.ckpt.*(truncated or corrupt|pickle)"):
        load_model(path)


class _Evil:
    def __reduce__(self):
        return (print, ("this would run",))


def test_ckpt_that_needs_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "cb": _Evil()}, path)
    with pytest.raises(CheckpointFileError, match="evil.ckpt.*weights_only=True"):
        load_model(path)


def _payloads():
    """(name, callable, args maker) of the usual malicious-pickle payloads; each would create `marker` if run.
    os.system pickles as posix.system (nt.system on Windows); the native module's own name is tried too."""
    native_system = __import__(os.name).system
    return [("os_system", os.system, lambda m: (f"echo > {m}",)),
            ("posix_system", native_system, lambda m: (f"echo > {m}",)),
            ("subprocess", subprocess.call, lambda m: (["touch", str(m)],))]


class _Payload:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", _payloads(), ids=lambda p: p[0])
def test_ckpt_that_runs_a_command_is_refused_not_called_corrupt(tmp_path, payload, zip_format):
    # torch words a blocked module (os/posix/subprocess) otherwise than an unknown global; either is "needs more
    # than plain tensors", never "truncated or corrupt". weights_only=True refuses before calling anything.
    _, func, args = payload
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "cb": _Payload(func, args(marker))}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointFileError, match="evil.ckpt: this pickle needs more than plain tensors") as e:
        load_model(path)
    assert "corrupt" not in str(e.value)
    assert not marker.exists()


def test_lora_given_as_checkpoint(tmp_path):
    path = _write(tmp_path, {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
                             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)})
    with pytest.raises(ModelKindError, match=r"lora.safetensors|m.safetensors.*adapter \(LoRA/LyCORIS\)"):
        load_model(path)


@pytest.mark.parametrize("keys,found", [
    (["model.diffusion_model.joint_blocks.0.x.weight"], "SD3"),
    (["double_blocks.0.img_attn.qkv.weight"], "Flux"),
    (["conditioner.embedders.0.model.ln_final.weight", "model.diffusion_model.input_blocks.0.0.weight"], "refiner"),
    (["model.diffusion_model.input_blocks.0.0.weight"], "U-Net alone"),
    (["foo.bar"], "unknown kind"),
])
def test_other_architectures_are_named(tmp_path, keys, found):
    path = _write(tmp_path, {k: torch.zeros(2) for k in keys})
    with pytest.raises(ModelKindError, match=f"m.safetensors: expected a Stable Diffusion.*{found}"):
        load_model(path)


def test_missing_key_is_named(sd_tensors, tmp_path):
    tensors = dict(sd_tensors)
    del tensors["model.diffusion_model.out.2.weight"]
    path = _write(tmp_path, tensors)
    with pytest.raises(ModelKindError, match=r"m.safetensors.*out\.2\.weight"):
        load_model(path)


def test_missing_component_is_named(sd_tensors, tmp_path):
    tensors = {k: v for k, v in sd_tensors.items() if not k.startswith("first_stage_model.")}
    path = _write(tmp_path, tensors)
    with pytest.raises(ModelKindError, match="without vae tensors.*first_stage_model.*vae="):
        load_model(path)


def test_wrong_shape_is_named(sd_tensors, tmp_path):
    tensors = dict(sd_tensors)
    key = "model.diffusion_model.out.2.weight"
    tensors[key] = torch.zeros(5, *tensors[key].shape[1:])
    path = _write(tmp_path, tensors)
    with pytest.raises(ModelKindError, match=r"match no bundled config.*out\.2\.weight"):
        load_model(path)


@pytest.mark.parametrize("override,match", [
    ({"v2": True}, r"v2=True was given but the file is an SD1.x checkpoint"),
    ({"sdxl": True}, r"sdxl=True was given but the file is an SD1.x checkpoint"),
])
def test_wrong_overrides(sd_tensors, tmp_path, override, match):
    path = _write(tmp_path, sd_tensors)
    with pytest.raises(ModelKindError, match=match):
        load_model(path, **override)
    load_model(path, v2=False, sdxl=False)  # right ones are accepted


def test_wrong_dtype_is_named(sd_tensors, tmp_path):
    path = _write(tmp_path, sd_tensors)
    with pytest.raises(ValueError, match=r"dtype='int8' is not a floating-point dtype.*fp16"):
        load_model(path, dtype="int8")
    with pytest.raises(ValueError, match="vae_dtype='fp17'"):
        load_model(path, vae_dtype="fp17")


def test_missing_path_and_demo_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors: no such file or folder"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="unknown demo model 'demo:tiny-sd3'.*demo:tiny-sd"):
        load_model("demo:tiny-sd3")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelKindError, match="not a diffusers model folder"):
        load_model(tmp_path)


def test_bad_vae_file(sd_tensors, tmp_path):
    path = _write(tmp_path, sd_tensors)
    lora = _write(tmp_path, {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, "lora.safetensors")
    with pytest.raises(ModelKindError, match=r"vae=.*lora.safetensors: expected a VAE.*adapter"):
        load_model(path, vae=lora)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from lorakit.models.save import save_diffusers

    folder = tmp_path_factory.mktemp("folder") / "tiny_sd"
    save_diffusers(_model("tiny-sd"), folder)
    return folder


def _broken_copy(folder, tmp_path, relative, text):
    import shutil

    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    (copy / relative).write_text(text, encoding="utf-8")
    return copy


@pytest.mark.parametrize("relative", ["model_index.json", "unet/config.json", "text_encoder/config.json",
                                      "vae/config.json", "scheduler/scheduler_config.json"])
def test_broken_json_in_a_model_folder_is_named(sd_folder, tmp_path, relative):
    folder = _broken_copy(sd_folder, tmp_path, relative, '{"_class_name": "X", "block_out_channels": [32, 32,')
    with pytest.raises(ModelKindError, match=rf"broken/{relative}: not valid JSON \(.*line 1 column \d+\)"):
        load_model(folder)


def test_broken_json_in_config_and_vae_folders_is_named(sd_folder, sd_tensors, tmp_path):
    folder = _broken_copy(sd_folder, tmp_path, "unet/config.json", "{oops")
    path = _write(tmp_path, sd_tensors)
    with pytest.raises(ModelKindError, match=r"broken/unet/config.json: not valid JSON \(Expecting property"):
        load_model(path, config=folder)
    (folder / "unet/config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ModelKindError, match=r"broken/unet/config.json: expected a JSON object.*list"):
        load_model(path, config=folder)
    (folder / "vae/config.json").write_text("{oops", encoding="utf-8")
    for vae in (folder, folder / "vae"):
        with pytest.raises(ModelKindError, match=r"broken/vae/config.json: not valid JSON"):
            load_model(path, vae=vae)


def test_vae_file_missing_a_key_names_the_file_and_no_absent_prefix(sd_tensors, tmp_path):
    path = _write(tmp_path, sd_tensors)
    for prefix in ("", "first_stage_model."):
        vae = {prefix + k.removeprefix("first_stage_model."): v for k, v in sd_tensors.items()
               if k.startswith("first_stage_model.")}
        del vae[prefix + "decoder.up.0.block.0.conv1.weight"]
        vae_file = _write(tmp_path, vae, "vae_missing.safetensors")
        with pytest.raises(ModelKindError, match=r"vae=.*vae_missing.safetensors: .*lacks 1 key\(s\)"
                                                 r".*decoder\.up\.0\.block\.0\.conv1\.weight") as info:
            load_model(path, vae=vae_file)
        assert ("first_stage_model." in str(info.value)) == bool(prefix)
