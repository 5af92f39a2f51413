"""wandb_run_name / log_tracker_config / log_config (what the trackers are started with), console_log_level /
console_log_file / console_log_simple, output_config, and the errors of the newer scheduler and counter options.
wandb and tensorboard are optional: a stand-in wandb module records what wandb.init receives."""

from __future__ import annotations

import logging
import sys
import types

import pytest

from lorakit.algos.options import OptionError
from lorakit.cli import main
from lorakit.train.config import load_train_config
from lorakit.train.console_log import console_logging
from lorakit.train.logger import TrainLogger
from lorakit.train.tracker_config import loggable_config, tracker_init_kwargs

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []
    module = types.ModuleType("wandb")
    module.init = lambda **kw: calls.append(kw) or types.SimpleNamespace(
        log=lambda *a, **k: None, define_metric=lambda *a, **k: None, finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return calls


def _config(**overrides):
    return load_train_config(overrides=dict(log_with="wandb", **overrides))


def test_log_config_sends_the_options_without_secrets_or_paths(fake_wandb, tmp_path):
    config = _config(log_config=True, wandb_api_key="secret", network_dim=8, network_args=["algo=loha"],
                     pretrained_model_name_or_path=str(tmp_path / "model.safetensors"), output_dir=str(tmp_path),
                     log_tracker_name="proj")
    TrainLogger(config, total=3).close()
    (call,) = fake_wandb
    sent = call["config"]
    assert sent["network_dim"] == 8 and sent["log_config"] is True and sent["lr_scheduler"] == "constant"
    assert sent["network_args"] == "['algo=loha']"  # trackers take scalars: lists as text, as sd-scripts
    for hidden in ("wandb_api_key", "pretrained_model_name_or_path", "output_dir", "logging_dir", "train_data_dir"):
        assert hidden not in sent
    assert set(sent) == set(loggable_config(config)) and len(sent) > 150
    assert call["project"] == "proj" and "name" not in call
    # without log_config the trackers get no configuration (sd-scripts passes None)
    fake_wandb.clear()
    TrainLogger(_config(network_dim=8), total=3).close()
    assert fake_wandb[0]["config"] is None and loggable_config(_config()) is None


def test_run_name_and_tracker_config_file(fake_wandb, tmp_path):
    TrainLogger(_config(wandb_run_name="first try"), total=3).close()
    assert fake_wandb[-1]["name"] == "first try"
    path = tmp_path / "trackers.toml"
    path.write_text('[wandb]\ntags = ["lora", "test"]\nentity = "me"\n[tensorboard]\nflush_secs = 5\n')
    config = _config(wandb_run_name="first try", log_tracker_config=str(path))
    assert tracker_init_kwargs(config) == {"wandb": {"name": "first try", "tags": ["lora", "test"], "entity": "me"},
                                           "tensorboard": {"flush_secs": 5}}
    TrainLogger(config, total=3).close()
    assert fake_wandb[-1]["tags"] == ["lora", "test"] and fake_wandb[-1]["name"] == "first try"
    path.write_text('[wandb]\nname = "from the file"\n')
    assert tracker_init_kwargs(config)["wandb"] == {"name": "from the file"}  # the file's keys win
    path.write_text('project = "x"\n')
    with pytest.raises(OptionError, match="log_tracker_config=.*expected tables \\[tensorboard\\], \\[wandb\\]"):
        tracker_init_kwargs(config)
    with pytest.raises(OptionError, match="log_tracker_config=.*missing.toml: cannot read it"):
        tracker_init_kwargs(_config(log_tracker_config=str(tmp_path / "missing.toml")))


def test_console_log_options(tmp_path, capsys):
    log = logging.getLogger("lorakit.train.somewhere")
    path = tmp_path / "run.log"
    with console_logging(load_train_config(overrides={"console_log_file": str(path), "console_log_simple": True})):
        log.info("an info line")
        log.debug("a debug line")
    log.warning("after the run")  # the handler is gone
    assert path.read_text() == "an info line\n"
    with console_logging(load_train_config(overrides={"console_log_level": "debug"})):
        log.debug("a debug line")
    err = capsys.readouterr().err
    assert "DEBUG lorakit.train.somewhere: a debug line" in err
    assert logging.getLogger("lorakit").level == logging.NOTSET and not logging.getLogger("lorakit").handlers
    with console_logging(load_train_config(overrides={"console_log_level": "ERROR"})):
        log.warning("hidden")
    assert "hidden" not in capsys.readouterr().err


def test_console_log_level_help_says_what_an_unset_level_does(capsys):
    """`lorakit train` without console options shows INFO messages (sd-scripts' default level); --help says so."""
    from lorakit.train.console_log import default_console_logging

    with default_console_logging(load_train_config()):
        logging.getLogger("lorakit.train.somewhere").info("an info line")
    assert "an info line" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "level of the console log (unset: INFO;" in " ".join(capsys.readouterr().out.split())


def test_output_config_writes_the_options_and_exits(tmp_path, capsys):
    target = tmp_path / "written"
    args = ["train", "--config_file", str(target), "--output_config", "--network_dim", "8", "--flip_aug",
            "--wandb_api_key", "secret", "--lr_scheduler", "warmup_stable_decay", "--lr_decay_steps", "0.2"]
    assert main(args) == 0
    data = tomllib.loads((tmp_path / "written.toml").read_text())
    flat = {k: v for section in data.values() for k, v in section.items()}
    assert flat["network_dim"] == 8 and flat["flip_aug"] is True and flat["lr_decay_steps"] == 0.2
    assert "wandb_api_key" not in flat and "output_config" not in flat
    again = load_train_config(tmp_path / "written.toml")
    assert (again.network_dim, again.lr_scheduler, again.lr_decay_steps) == (8, "warmup_stable_decay", 0.2)
    assert main(args) == 2 and "already exists" in capsys.readouterr().err  # never overwritten
    assert main(["train", "--output_config"]) == 2 and "output_config needs config_file" in capsys.readouterr().err
    inside = tmp_path / "inside.toml"
    inside.write_text("output_config = true\n")
    assert main(["train", "--config", str(inside), "--print-config"]) == 2
    assert "output_config belongs on the command line" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,message", [
    ({"console_log_level": "LOUD"}, "option 'console_log_level': 'LOUD' is not one of DEBUG, INFO"),
    ({"lr_scheduler_min_lr_ratio": 1.5}, "option 'lr_scheduler_min_lr_ratio': expected a value in [0, 1]"),
    ({"lr_scheduler_timescale": 0}, "option 'lr_scheduler_timescale': expected a value >= 1"),
    ({"lr_decay_steps": "1.5"}, "option 'lr_decay_steps': expected a whole number of steps"),
    ({"initial_epoch": 0}, "option 'initial_epoch': expected a value >= 1"),
    ({"initial_step": -2}, "option 'initial_step': expected a value >= 0"),
    ({"ddp_timeout": 0}, "option 'ddp_timeout': expected a value >= 1"),
    ({"lr_scheduler": "cosine_warmup_with_min_lr"}, "sd-scripts' get_scheduler_fix cannot build it either"),
])
def test_bad_values_name_the_option(overrides, message):
    with pytest.raises(OptionError) as err:
        load_train_config(overrides=overrides)
    assert message in str(err.value)


def test_scheduler_and_counter_combinations():
    with pytest.raises(OptionError, match="'cosine_with_min_lr' needs lr_scheduler_min_lr_ratio"):
        load_train_config(overrides={"lr_scheduler": "cosine_with_min_lr"})
    assert load_train_config(overrides={"lr_scheduler": "cosine_with_min_lr",
                                        "lr_scheduler_args": ["min_lr=1e-6"]}).lr_scheduler_args == ("min_lr=1e-6",)
    notes = load_train_config(overrides={"lr_scheduler": "cosine", "lr_decay_steps": 10, "initial_step": 4,
                                         "initial_epoch": 2, "lr_scheduler_type": "StepLR"}).warnings
    assert "lr_decay_steps is used by lr_scheduler warmup_stable_decay only; unused with lr_scheduler_type" in notes
    assert "lr_scheduler_type 'StepLR' replaces lr_scheduler 'cosine'" in notes
    assert any("initial_step is used" in n for n in notes)
    assert load_train_config(overrides={"lr_scheduler": "warmup_stable_decay", "lr_decay_steps": 10}).warnings == ()


def test_a_missing_tracker_package_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    import importlib.util

    from lorakit.train.checks import check_runnable

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "wandb") else real(name, *a))
    base = {"pretrained_model_name_or_path": "demo:tiny-sd", "train_data_dir": str(tmp_path),
            "resolution": "64", "output_dir": str(tmp_path / "out")}
    check_runnable(load_train_config(overrides=base))
    with pytest.raises(OptionError, match="logging_dir needs the tensorboard package"):
        check_runnable(load_train_config(overrides={**base, "logging_dir": str(tmp_path / "logs")}))
    with pytest.raises(OptionError, match="log_with=wandb needs the wandb package"):
        check_runnable(load_train_config(overrides={**base, "log_with": "wandb"}))


def test_log_with_all_needs_both_tracker_packages(tmp_path, monkeypatch):
    """log_with=all starts TensorBoard and wandb (as accelerate's "all"), so the check before the model loads names
    each of their packages that is missing, not only those of log_with=tensorboard or wandb."""
    import importlib.util

    from lorakit.train.logger import missing_tracker_packages

    config = load_train_config(overrides={"log_with": "all", "logging_dir": str(tmp_path)})
    missing = {"tensorboard", "wandb"}
    installed = types.SimpleNamespace()  # a found package's spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else installed)
    assert missing_tracker_packages(config) == ["logging_dir needs the tensorboard package: pip install tensorboard",
                                                "log_with=wandb needs the wandb package: pip install wandb"]
    missing = {"wandb"}
    assert missing_tracker_packages(config) == ["log_with=wandb needs the wandb package: pip install wandb"]


def test_tracker_config_refuses_an_unknown_tracker_table_and_bad_toml(tmp_path):
    # a table for a tracker that is not started ([mlflow]) would be silently dropped; a syntax error names the file
    path = tmp_path / "trackers.toml"
    path.write_text('[mlflow]\nrun_name = "x"\n')
    config = _config(log_tracker_config=str(path))
    with pytest.raises(OptionError, match="log_tracker_config=.*expected tables.*'mlflow'"):
        tracker_init_kwargs(config)
    path.write_text('[wandb\nname = "x"\n')
    with pytest.raises(OptionError, match="log_tracker_config=.*not valid TOML"):
        tracker_init_kwargs(config)


def test_console_log_file_is_rewritten_each_run(tmp_path):
    # sd-scripts' setup_logging opens console_log_file with mode "w": a second run does not append to the first
    log = logging.getLogger("lorakit.train.somewhere")
    path = tmp_path / "run.log"
    path.write_text("an older run\n")
    for line in ("first run", "second run"):
        with console_logging(load_train_config(overrides={"console_log_file": str(path), "console_log_simple": True})):
            log.info(line)
    assert path.read_text() == "second run\n"


def test_console_log_simple_alone_shows_info_messages_plainly(capsys):
    # console_log_simple by itself is a console option: INFO (sd-scripts' level when none is given), message only
    log = logging.getLogger("lorakit.train.somewhere")
    with console_logging(load_train_config(overrides={"console_log_simple": True})):
        log.info("an info line")
        log.debug("a debug line")
    assert capsys.readouterr().err == "an info line\n"
