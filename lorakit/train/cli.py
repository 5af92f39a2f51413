"""`lorakit train` and `lorakit explore` `--config run.toml [--option value ...] [--print-config]`: every option
of options.py as `--name` (sd-scripts' spelling); the config file's values, overridden by the command line,
resolved and checked; then the training loop (lorakit.train.run), or with --print-config the resolved TOML."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import time

from ..algos.options import OptionError
from .config import LIST_KINDS
from .options import (ALIASES, BY_NAME, COMMAND_LINE_ONLY, GROUPS, GUI_KEYS, coerce, explore_only,
                      explore_only_note, options_in)

# the CLI's own flags, which options.py does not list: a misspelt one is suggested too
_CLI_FLAGS = ("config", "print-config", "print_config")
# argparse before Python 3.13 takes "-1e-4" for an option (its pattern knows -1 and -.5 only), so
# `--learning_rate -1e-4` printed the whole usage instead of the value check's one line
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class _TrainParser(argparse.ArgumentParser):
    """Keeps unknown arguments instead of failing on them, so that the error can name the closest option."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        namespace.unknown_args = list(getattr(namespace, "unknown_args", [])) + list(extras)
        return namespace, []


class _OneConfigFile(argparse.Action):
    """--config and --config_file are one option: given twice (as either name) the run would read only the last.
    The second is kept aside for run() to refuse in the command's one-line error form (argparse prints its usage)."""

    def __call__(self, parser, namespace, values, option_string=None):
        earlier = getattr(namespace, self.dest, None)
        if earlier is not None:
            namespace.config_given_twice = (f"{option_string} {values}: the config file was already given "
                                            f"({earlier}); --config and --config_file are one option, give it once")
        setattr(namespace, self.dest, values)


def _help(opt) -> str:
    default = "unset" if opt.default is None else "none" if opt.default == () else repr(opt.default)
    choices = f"; one of {', '.join(map(str, opt.choices))}" if opt.choices else ""
    return f"{opt.help}{choices} (default: {default})".replace("%", "%%")


_COMMANDS = {
    "train": ("train an adapter (sd-scripts config files and option names)",
              "Train a LoRA/LyCORIS adapter. Options come from --config (an sd-scripts --config_file TOML or a "
              "kohya_ss GUI LoRA .json works unchanged), then from the command line; docs/training.md describes "
              "every option."),
    "explore": ("search the layer-wise application rates of trained adapters (sd-scripts' appl_weights)",
                "Learn one application rate per block for each adapter file in network_weights, by training on "
                "images with the adapters frozen, as sd-scripts' train_network_appl_weights.py (SDXL and SD1/SD2). "
                "Every option of `lorakit train` applies; docs/training.md ('Application rates') describes the "
                "run and its output."),
}


def add_parser(commands) -> None:
    for command, (short, description) in _COMMANDS.items():
        parser = commands.add_parser(command, help=short, allow_abbrev=False, description=description)
        parser.__class__ = _TrainParser
        parser.add_argument("--config", "--config_file", dest="config_file", metavar="FILE", action=_OneConfigFile,
                            help="the config file: sd-scripts' --config_file TOML, or a kohya_ss GUI LoRA .json")
        parser.add_argument("--print-config", "--print_config", dest="print_config", action="store_true",
                            help="print the resolved configuration as TOML and exit")
        for group in GROUPS:
            if group == "explore" and command != "explore":
                continue
            arguments = parser.add_argument_group(group)
            for opt in options_in(group):
                kwargs = {"dest": opt.name, "default": argparse.SUPPRESS,
                          "help": _help(opt) if opt.supported else argparse.SUPPRESS}
                if opt.kind == "bool":
                    kwargs.update(nargs="?", const="true", metavar="BOOL")
                elif opt.kind in LIST_KINDS:
                    kwargs.update(nargs="*", metavar="VALUE")
                else:
                    kwargs.update(metavar={"choice_int": "INT", "steps": "STEPS|RATIO"}.get(opt.kind,
                                                                                             opt.kind.upper()))
                arguments.add_argument(f"--{opt.name}", *(f"--{a}" for a in opt.aliases), **kwargs)
        parser._negative_number_matcher = _NEGATIVE_NUMBER
        parser.set_defaults(run=run, command_name=command)


def run(args: argparse.Namespace) -> int:
    from .checks import check_runnable
    from .config import load_train_config, output_config_file, parse_command_line, print_config

    command = getattr(args, "command_name", "train")
    overrides = {name: getattr(args, name) for name in BY_NAME if hasattr(args, name)}
    try:
        if getattr(args, "config_given_twice", None):
            raise OptionError(args.config_given_twice)
        if getattr(args, "unknown_args", None):
            _refuse_misspelt_cli_flags(args.unknown_args)
            given = parse_command_line(args.unknown_args)  # raises the error naming the closest option
            explore = explore_only(given)  # only explore's parser has them
            if explore:
                raise OptionError(f"--{explore_only_note(explore[0])}")
            raise OptionError(f"unexpected arguments: {' '.join(args.unknown_args)}")
        if coerce(BY_NAME["output_config"], overrides.pop("output_config", None)):
            # sd-scripts: --config_file names the file to write, not one to read
            if not args.config_file:
                raise OptionError("output_config needs config_file: the file to write the options to")
            written = output_config_file(load_train_config(None, overrides), args.config_file)
            print(f"lorakit {command}: options written to {written}", file=sys.stderr)
            return 0
        config = load_train_config(args.config_file, overrides)
        if config.output_config:
            raise OptionError("output_config belongs on the command line: inside a config file it would rewrite "
                              "the file it is read from")
    except OptionError as err:
        print(f"lorakit {command}: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print_config(config)
        return 0
    try:
        check_runnable(config)
    except OptionError as err:
        print(f"lorakit {command}: error: {err}", file=sys.stderr)
        return 2
    from .console_log import default_console_logging
    from .run import TrainingError, train

    started = time.time()
    try:
        with default_console_logging(config):  # the run's summary, as sd-scripts prints it by default
            result = train(config, explore=True) if command == "explore" else train(config)
    except (ValueError, OSError, TrainingError) as err:
        # lorakit's input errors (options, data, state, model files) and a stopped run: their message says what
        # and where, so one line, as for the checks above (an unexpected error keeps its traceback)
        print(f"lorakit {command}: error: {worker_error_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lorakit {command}: interrupted; {_where_to_resume(config, started)}", file=sys.stderr)
        return 130  # the shell's code for a run stopped by Ctrl-C
    return result if isinstance(result, int) else 0


def _where_to_resume(config, started: float) -> str:
    """The newest state a stopped run can go on from: one of its output_name that it saved (saves are atomic:
    whatever is there is whole), else the one it resumed from. States of other runs in output_dir, or older ones of
    the same name, would resume other adapters or other settings."""
    from pathlib import Path

    from .outputs import OutputNames
    from .state import no_state_yet

    names = OutputNames(config.output_dir, config.output_name, config.save_model_as)
    saved = [p for p in _states_named(names) if _saved_at(p) >= started - _CLOCK_SLACK_S]
    resumed = Path(config.resume) if config.resume and not config.resume_from_huggingface else None
    states = saved + ([resumed] if resumed is not None and _saved_at(resumed) > 0 else [])
    if not states:
        return no_state_yet(config)
    newest = max(states, key=_saved_at)
    return f"to go on from the last state saved, resume = \"{newest}\""


_CLOCK_SLACK_S = 1.0  # file times come from a coarser clock than time.time(), a little behind it


def _states_named(names) -> list:
    """The state folders in output_dir under the run's names: its final state and its epoch and step states."""
    if not names.dir.is_dir():
        return []
    own = []
    for path in names.dir.glob("*-state"):
        number = re.search(r"(\d+)-state$", path.name)
        if path == names.final_state() or (number is not None and path in (
                names.step_state(int(number[1])), names.epoch_state(int(number[1])))):
            own.append(path)
    return own


def _saved_at(state) -> float:
    """When a state folder's train_state.json (its last file) was written; 0 when it has none."""
    try:
        return (state / "train_state.json").stat().st_mtime
    except OSError:
        return 0.0


def _refuse_misspelt_cli_flags(unknown: list[str]) -> None:
    """An unknown --name closest to one of the CLI's own flags (--confg: --config) names that flag; the others are
    left to parse_command_line, which suggests among the options."""
    known = sorted(set(BY_NAME) | set(ALIASES) | set(GUI_KEYS) | set(COMMAND_LINE_ONLY) | set(_CLI_FLAGS))
    for token in unknown:
        if not token.startswith("--"):
            continue
        key = token[2:].partition("=")[0]
        close = difflib.get_close_matches(key, known, n=1)
        if close and close[0] in _CLI_FLAGS:
            raise OptionError(f"unknown option '{key}' (did you mean '{close[0]}'?)")


def worker_error_message(err: BaseException) -> str:
    """The message of an error, or, for one raised in a DataLoader worker (which torch re-raises as "Caught X in
    DataLoader worker process N. Original Traceback ..."), the original message alone."""
    text = str(err)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]  # "module.ErrorType: message"
        return last.split(": ", 1)[1] if ": " in last else last
    return text
