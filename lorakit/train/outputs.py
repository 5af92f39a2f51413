"""Output file and state-folder names as sd-scripts writes them, and the save_last_n_* clean-up.

    {output_name}.safetensors                 final adapter        {output_name}-state               final state
    {output_name}-{epoch:06d}.safetensors     every n epochs       {output_name}-{epoch:06d}-state
    {output_name}-step{step:08d}.safetensors  every n steps        {output_name}-step{step:08d}-state

Without output_name each kind takes sd-scripts' own name (library/train_util.py DEFAULT_LAST_OUTPUT_NAME,
DEFAULT_EPOCH_NAME, DEFAULT_STEP_NAME): last.safetensors / last-state, epoch-000001.safetensors / epoch-000001-state,
at-step00000020.safetensors / at-step00000020-state; sample images then have no name prefix.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..formats.atomic import remove_folder

__all__ = ["OutputNames"]


# sd-scripts' names of each kind of save when output_name is not given
LAST_NAME, EPOCH_NAME, STEP_NAME = "last", "epoch", "at"


class OutputNames:
    def __init__(self, output_dir: str | Path, output_name: str | None, save_model_as: str = "safetensors"):
        self.dir = Path(output_dir)
        self.output_name = output_name or None  # "" is how a command line unsets a config file's name
        self.ext = "." + save_model_as

    def _name(self, default: str) -> str:
        return self.output_name or default

    def final(self) -> Path:
        return self.dir / f"{self._name(LAST_NAME)}{self.ext}"

    def epoch(self, epoch: int) -> Path:
        return self.dir / f"{self._name(EPOCH_NAME)}-{epoch:06d}{self.ext}"

    def step(self, step: int) -> Path:
        return self.dir / f"{self._name(STEP_NAME)}-step{step:08d}{self.ext}"

    def holds(self, path: str | Path) -> bool:
        """Whether ``path`` is one of the files this run may save (final, epoch or step)."""
        path = Path(path).resolve()
        if path.parent != self.dir.resolve() or path.suffix != self.ext:
            return False
        patterns = (re.escape(self._name(LAST_NAME)), rf"{re.escape(self._name(EPOCH_NAME))}-\d{{6}}",
                    rf"{re.escape(self._name(STEP_NAME))}-step\d{{8}}")
        return any(re.fullmatch(p, path.stem) for p in patterns)

    def final_state(self) -> Path:
        return self.dir / f"{self._name(LAST_NAME)}-state"

    def epoch_state(self, epoch: int) -> Path:
        return self.dir / f"{self._name(EPOCH_NAME)}-{epoch:06d}-state"

    def step_state(self, step: int) -> Path:
        return self.dir / f"{self._name(STEP_NAME)}-step{step:08d}-state"

    def config_file(self) -> Path:
        return self.dir / f"{self._name(LAST_NAME)}_config.toml"

    def sample_dir(self) -> Path:
        return self.dir / "sample"

    def check_kinds(self, states: bool, samples: bool) -> None:
        """Output paths that exist as the wrong kind (a folder named like the final adapter, a file named like the
        final state or the sample folder) would fail the run at its end, after all the training: refused first."""
        self._check_folder()
        wrong = [(self.final(), "a folder", Path.is_dir, "output")]
        if states:
            wrong.append((self.final_state(), "a file", Path.is_file, "output"))
        if samples:
            wrong.append((self.sample_dir(), "a file", Path.is_file, "samples"))
        for path, kind, test, what in wrong:
            if test(path):
                raise FileExistsError(f"{path}: is {kind}, where this run writes its {what}; move it away or "
                                      "change output_dir / output_name")

    def _check_folder(self) -> None:
        """output_dir (or a folder above it) that exists as a file: one line naming it, not mkdir's errno."""
        existing = next((p for p in (self.dir, *self.dir.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            where = "output_dir" if existing == self.dir else f"output_dir {self.dir}"
            raise FileExistsError(f"{existing}: is a file, where {where} needs a folder; move it away or change "
                                  "output_dir")

    # --- save_last_n_*: keep the newest n saves (sd-scripts removes only the one that falls out of the window at
    # each save, so a kill before that removal, or a resume with a smaller n, leaves older saves for good) --
    def prune_epochs(self, epoch: int, every: int, keep: int | None, state: bool = False) -> None:
        """Every save of this schedule (each ``every`` epochs) up to ``epoch - every * keep`` goes, gaps or not."""
        if not keep:
            return
        for old in range(epoch - every * keep, 0, -every):
            _remove(self.epoch_state(old) if state else self.epoch(old))

    def prune_steps(self, step: int, every: int, keep: int | None, state: bool = False) -> None:
        """save_last_n_steps counts steps, not saves: saves older than ``step - keep`` go."""
        if not keep:
            return
        old = step - keep - 1
        old -= old % every
        while old > 0:
            path = self.step_state(old) if state else self.step(old)
            if not path.exists():
                break
            _remove(path)
            old -= every


def _remove(path: Path) -> None:
    if path.is_dir():  # a state folder: never left half-deleted under its name, which a resume would refuse
        remove_folder(path)
    elif path.exists():
        path.unlink()
