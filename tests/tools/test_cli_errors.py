"""What every tool command does with bad input: one `lorakit <command>: error:` line and exit status 1 (no
traceback), no output written over one of its inputs, and an unusable --device refused before any loading."""

from __future__ import annotations

import pytest
import torch

from lorakit.cli import main
from lorakit.formats import load_file, save_file

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tools/conftest.py


def _lora(path, r=4, nan=False):
    g = torch.Generator().manual_seed(0)
    down = torch.randn(r, 12, generator=g)
    if nan:
        down[0, 0] = float("nan")
    save_file({"lora_unet_a.lora_down.weight": down, "lora_unet_a.lora_up.weight": torch.randn(8, r, generator=g),
               "lora_unet_a.alpha": torch.tensor(2.0)}, path, metadata={"ss_network_dim": str(r)})
    return path


def _one_error_line(capsys, command, *fragments):
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lorakit {command}: error: ") and "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("command,argv", [
    ("resize", ["resize", "{src}", "{src}", "--new_rank", "2"]),
    ("convert", ["convert", "{src}", "{src}", "--to", "peft"]),
    ("merge", ["merge", "--loras", "{other}", "{src}", "--save_to", "{src}"]),
    ("merge", ["merge", "--model", "{src}", "--loras", "{other}", "--save_to", "{src}"]),
    ("extract", ["extract", "{src}", "{other}", "{src}"]),
    ("extract", ["extract", "{other}", "{src}", "{src}"]),
])
def test_an_output_that_is_an_input_is_refused_and_the_input_kept(tmp_path, capsys, command, argv):
    src, other = _lora(tmp_path / "a.safetensors"), _lora(tmp_path / "b.safetensors", r=2)
    before = src.read_bytes()
    assert main([a.format(src=src, other=other) for a in argv]) == 1
    _one_error_line(capsys, command, "a.safetensors: is also the ")
    assert src.read_bytes() == before


def test_an_output_folder_is_never_a_folder_of_other_files(tmp_path, capsys):
    """merge --save_to a folder writes a diffusers model there, replacing the folder whole: it deleted a folder
    holding the inputs (or anything else). A folder holding an input, or files that are not a diffusers model, is
    refused; the files stay."""
    folder = tmp_path / "work"
    folder.mkdir()
    src, other = _lora(folder / "a.safetensors"), _lora(tmp_path / "b.safetensors", r=2)
    assert main(["merge", "--loras", str(src), str(other), "--save_to", str(folder)]) == 1
    _one_error_line(capsys, "merge", "holds the adapter #1 of --loras", "write the output elsewhere")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    assert main(["merge", "--loras", str(other), "--save_to", str(tmp_path / "notes")]) == 1
    _one_error_line(capsys, "merge", "is a folder with files that is not a diffusers model")
    assert src.is_file() and (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_missing_files_and_nan_factors_are_one_line_errors(tmp_path, capsys):
    assert main(["resize", str(tmp_path / "nope.safetensors"), str(tmp_path / "o.safetensors"), "--new_rank", "2"]) == 1
    _one_error_line(capsys, "resize", "nope.safetensors")
    assert main(["extract", str(tmp_path / "nope.safetensors"), str(tmp_path / "nope2.safetensors"),
                 str(tmp_path / "o.safetensors")]) == 1
    _one_error_line(capsys, "extract", "nope.safetensors")
    bad = _lora(tmp_path / "nan.safetensors", nan=True)
    assert main(["resize", str(bad), str(tmp_path / "o.safetensors"), "--new_rank", "2"]) == 1
    _one_error_line(capsys, "resize", "nan.safetensors: module 'lora_unet_a': holds NaN or Inf")
    assert not (tmp_path / "o.safetensors").exists()
    folder = tmp_path / "loras"
    folder.mkdir()
    for given, said in ((folder, "loras: is a folder, expected an adapter file (given with --loras)"),
                        (tmp_path / "nope.safetensors", "nope.safetensors: no such adapter file (given with --loras)")):
        assert main(["merge", "--loras", str(given), "--save_to", str(tmp_path / "m.safetensors")]) == 1
        _one_error_line(capsys, "merge", said)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_a_device_torch_cannot_use_is_refused_first(tmp_path, capsys):
    src = _lora(tmp_path / "a.safetensors")
    for argv in (["merge", "--model", "demo:tiny-sd", "--loras", str(src), "--save_to", str(tmp_path / "m")],
                 ["resize", str(src), str(tmp_path / "r.safetensors"), "--new_rank", "2"],
                 ["extract", "demo:tiny-sd", "demo:tiny-sd", str(tmp_path / "e.safetensors")]):
        assert main(argv + ["--device", "cuda"]) == 1
        _one_error_line(capsys, argv[0], "--device 'cuda': this torch has no CUDA device")
    assert main(["resize", str(src), str(tmp_path / "r.safetensors"), "--new_rank", "2", "--device", "gpu"]) == 1
    _one_error_line(capsys, "resize", "--device 'gpu'")


def test_resize_never_claims_a_higher_rank(tmp_path):
    src = _lora(tmp_path / "a.safetensors", r=4)
    assert main(["resize", str(src), str(tmp_path / "r.safetensors"), "--new_rank", "16"]) == 0
    tensors, meta = load_file(tmp_path / "r.safetensors")
    assert tensors["lora_unet_a.lora_down.weight"].shape[0] == 4 and meta["ss_network_dim"] == "4"


def test_nan_tensors_are_refused_by_merges_and_reported_by_convert(tmp_path, capsys):
    """A diverged training run's file: a merge would spread its NaN into the merged LoRA, so it is refused (no
    output); convert passes the tensors on as they are, never silently."""
    bad, good = _lora(tmp_path / "nan.safetensors", nan=True), _lora(tmp_path / "b.safetensors")
    assert main(["merge", "--loras", str(bad), str(good), "--save_to", str(tmp_path / "m.safetensors"),
                 "--quiet"]) == 1
    _one_error_line(capsys, "merge", "nan.safetensors: 1 tensor(s) hold NaN or Inf, e.g. lora_unet_a.lora_down.weight; "
                                     "merging would write them into the merged LoRA")
    assert not (tmp_path / "m.safetensors").exists()
    with pytest.warns(UserWarning, match=r"nan.safetensors: 1 tensor\(s\) hold NaN or Inf"):
        assert main(["convert", str(bad), str(tmp_path / "c.safetensors"), "--to", "peft"]) == 0


def test_pickled_adapters_from_sd_scripts_save_model_as_are_read(tmp_path, capsys):
    """sd-scripts (and lorakit train) can save adapters as .ckpt/.pt: plain tensors, read with weights_only=True by
    every tool, the same as the safetensors file; a pickled model checkpoint is named as one."""
    src = _lora(tmp_path / "a.safetensors")
    tensors, _ = load_file(src)
    torch.save(tensors, tmp_path / "a.pt")
    assert main(["inspect", str(tmp_path / "a.pt")]) == 0
    assert "lora_unet_a" in capsys.readouterr().out
    assert main(["resize", str(tmp_path / "a.pt"), str(tmp_path / "r.safetensors"), "--new_rank", "2"]) == 0
    assert main(["convert", str(tmp_path / "a.pt"), str(tmp_path / "c.safetensors")]) == 0
    assert load_file(tmp_path / "c.safetensors")[0].keys() == tensors.keys()
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, tmp_path / "model.ckpt")
    assert main(["inspect", str(tmp_path / "model.ckpt")]) != 0
    assert "is a model checkpoint" in capsys.readouterr().err


def test_an_output_that_is_a_link_to_an_input_is_refused(tmp_path, capsys):
    """A symbolic link to the input names the same file: refused as the input itself is."""
    src = _lora(tmp_path / "a.safetensors")
    link = tmp_path / "link.safetensors"
    link.symlink_to(src)
    assert main(["resize", str(src), str(link), "--new_rank", "2"]) == 1
    _one_error_line(capsys, "resize", "link.safetensors: is also the source file")
    assert link.is_symlink()


def test_resize_dynamic_options_come_as_a_pair(tmp_path, capsys):
    """--dynamic_param alone would be ignored (new_rank alone decides) and --dynamic_method alone has no parameter:
    either is one error line, exit 1, no output."""
    src = _lora(tmp_path / "a.safetensors")
    out = tmp_path / "r.safetensors"
    assert main(["resize", str(src), str(out), "--new_rank", "2", "--dynamic_param", "0.5"]) == 1
    _one_error_line(capsys, "resize", "--dynamic_param 0.5 needs --dynamic_method (sv_ratio, sv_fro or sv_cumulative)")
    assert main(["resize", str(src), str(out), "--new_rank", "2", "--dynamic_method", "sv_fro"]) == 1
    _one_error_line(capsys, "resize", "--dynamic_method needs --dynamic_param")
    assert not out.exists()
