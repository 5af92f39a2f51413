"""README's test command is the one CI runs, and the console command answers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import lorakit
from lorakit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert command in readme


def test_version_and_help():
    out = subprocess.run([sys.executable, "-m", "lorakit", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"lorakit {lorakit.__version__}"
    # --version answers without importing torch
    code = ("import contextlib, sys; from lorakit.cli import main\n"
            "with contextlib.suppress(SystemExit): main(['--version'])\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["lorakit", lorakit.__version__, "False"]
    out = subprocess.run([sys.executable, "-m", "lorakit", "--help"], capture_output=True, text=True, check=True)
    assert "usage: lorakit" in out.stdout and "algos" in out.stdout
    # so do --help and every command's --help: the parsers' modules leave torch to the commands' work
    code = ("import contextlib, io, sys\n"
            "from lorakit.cli import build_parser, main\n"
            "commands = build_parser()._subparsers._group_actions[0].choices\n"
            "for argv in [['--help']] + [[c, '--help'] for c in commands]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as text, contextlib.suppress(SystemExit):\n"
            "        main(argv)\n"
            "    assert 'usage: lorakit' in text.getvalue(), argv\n"
            "print(sorted(commands), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "False" and "'train'" in out.stdout and "'extract'" in out.stdout, out.stdout


def test_algos_lists_each_algorithm_with_its_options(capsys):
    assert main(["algos"]) == 0
    text = capsys.readouterr().out
    for name in ("lora, locon", "loha", "lokr", "ia3", "dylora", "glora", "diag-oft, oft", "boft", "full, native", "norm"):
        assert re.search(rf"^{re.escape(name)}$", text, re.M), name
    lokr = text.split("\nlokr\n")[1].split("\nia3")[0]
    assert "factor" in lokr and "decompose_both" in lokr and "block_size" not in lokr


def test_readme_quickstart_command_runs_the_example_config():
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("python3 -m venv") and "train" in line)
    config = command.split("--config", 1)[1].split()[0]
    assert (ROOT / config).is_file()
    out = subprocess.run([sys.executable, "-m", "lorakit", "train", "--config", config, "--print-config"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert 'pretrained_model_name_or_path = "demo:tiny-sd"' in out.stdout


def test_a_misspelt_flag_suggests_the_flag_the_docs_use(capsys):
    """--config and --print-config are the CLI's own flags: their typos name them, not the closest option."""
    for typo, expected in (("--confg", "config"), ("--print-confg", "print-config"), ("--config_fle", "config_file"),
                           ("--outptu_dir", "output_dir")):
        assert main(["train", typo, "x"]) == 2
        assert f"unknown option '{typo[2:]}' (did you mean '{expected}'?)" in capsys.readouterr().err


def test_the_config_file_given_twice_and_explore_options_on_train_are_one_line_errors(capsys):
    """--config and --config_file are one option: both given, the run read only the last. An option of lorakit
    explore on the train command line says whose it is."""
    assert main(["train", "--config", "a.toml", "--config_file", "b.toml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("lorakit train: error: --config_file b.toml: the config file was already given (a.toml); "
                   "--config and --config_file are one option, give it once")
    assert main(["train", "--application_layout", "sdxl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "lorakit train: error: --application_layout is an option of lorakit explore; lorakit train does " \
                  "not use it"


def test_a_negative_number_in_exponent_form_is_a_value_not_an_option(capsys):
    """`--learning_rate -1e-4` is the value check's one-line error (as `--learning_rate=-1e-4` and `-0.0001`), not
    argparse's whole usage ('expected one argument'); exponents in any case and form are values."""
    for value in ("-1e-4", "-1E-4", "-2.5e+3", "-.5e1", "-0.0001"):
        assert main(["train", "--learning_rate", value]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"lorakit train: error: option 'learning_rate': expected a value >= 0, got '{value}'", err


def test_no_command_prints_the_help_and_succeeds(capsys):
    """`lorakit` alone: the help on stdout and exit status 0, as `lorakit --help`."""
    assert main([]) == 0
    assert "usage: lorakit" in capsys.readouterr().out


def test_bitsandbytes_hub_kernel_warning_is_dropped_and_its_other_warnings_kept(capsys):
    """bitsandbytes' CPU backend logs that it could not fetch a 4-bit kernel from the Hugging Face Hub at every
    import on an AVX512-BF16 CPU; after main() that record is filtered out, any other of its records is not."""
    import logging

    assert main(["algos"]) == 0
    capsys.readouterr()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")

    def record(msg):
        return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, ("reason",), None)

    assert not logger.filter(record("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ..."))
    assert logger.filter(record("Failed to load the CPU library: %s"))


def test_output_piped_into_a_reader_that_stops_early_ends_quietly():
    """`lorakit algos | head -1`: the reader has closed the pipe (here before the first write, so that every run
    meets it); no BrokenPipeError traceback, exit 0."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = subprocess.run([sys.executable, "-m", "lorakit", "algos"], stdout=write_end, stderr=subprocess.PIPE,
                             text=True, timeout=120)
    finally:
        os.close(write_end)
    assert out.returncode == 0 and "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr


def test_warnings_read_as_one_line_without_the_source_that_raised_them(tmp_path):
    """A command's warning is 'warning: <what>' on stderr, not Python's 'path.py:123: UserWarning' and code line."""
    import torch
    from safetensors.torch import save_file

    down = torch.ones(4, 8)
    down[0, 0] = float("nan")
    save_file({"lora_unet_a.lora_down.weight": down, "lora_unet_a.lora_up.weight": torch.ones(8, 4)},
              str(tmp_path / "nan.safetensors"))
    out = subprocess.run([sys.executable, "-m", "lorakit", "convert", str(tmp_path / "nan.safetensors"),
                          str(tmp_path / "o.safetensors"), "--to", "kohya"], capture_output=True, text=True, check=True)
    lines = [line for line in out.stderr.splitlines() if "NaN" in line]
    assert lines == [f"warning: {tmp_path / 'nan.safetensors'}: 1 tensor(s) hold NaN or Inf, e.g. "
                     "lora_unet_a.lora_down.weight"], out.stderr
    assert "UserWarning" not in out.stderr and ".py:" not in out.stderr, out.stderr
