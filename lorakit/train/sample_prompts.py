"""``sample_prompts`` files as sd-scripts reads them, and drawing the samples during training.

.txt: one prompt per line (``#`` starts a comment) with options ``--n`` negative prompt, ``--w``/``--h`` size,
``--d`` seed, ``--l`` guidance scale, ``--s`` steps (clamped to 1..1000), ``--ss`` sampler, in any case (``--W``), as
sd-scripts' ``line_to_prompt_dict`` reads them. .toml: ``[prompt]`` holds the defaults
and each ``[[prompt.subset]]`` one prompt. .json: a list of objects, or of strings read as .txt lines (sd-scripts'
load_prompts). Keys: prompt, negative_prompt, width, height, seed, scale, sample_steps (1..1000), sample_sampler.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..formats.atomic import atomic_write, remove_stale_temporaries

__all__ = ["SamplePrompt", "read_sample_prompts", "draw_samples"]

logger = logging.getLogger(__name__)

_TXT_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "l": "scale", "s": "sample_steps",
                "ss": "sample_sampler"}
# The values sd-scripts' line_to_prompt_dict reads for each flag (re.match: the value's start; it ignores a flag whose
# value does not start so, where lorakit says so when the run starts).
_TXT_VALUES = {"w": (r"\d+", "a whole number"), "h": (r"\d+", "a whole number"), "d": (r"\d+", "a whole number"),
               "s": (r"\d+", "a whole number"), "l": (r"[\d.]+", "a number such as 7.5")}
_MAX_STEPS = 1000  # sd-scripts: sample_steps = max(1, min(1000, int(value)))
_KINDS = {"prompt": str, "negative_prompt": str, "width": int, "height": int, "seed": int, "scale": float,
          "sample_steps": int, "sample_sampler": str}


@dataclass
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    scale: float = 7.5
    sample_steps: int = 30
    sample_sampler: str | None = None


def read_sample_prompts(path: str | Path) -> list[SamplePrompt]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sample_prompts={path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"sample_prompts={path}: not UTF-8 text ({e})") from None
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib

        try:
            data = tomllib.loads(text).get("prompt", {})
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"sample_prompts={path}: not valid TOML ({e})") from None
        defaults = {k: v for k, v in data.items() if k != "subset"}
        entries = [{**defaults, **subset} for subset in data.get("subset", [])]
    elif path.suffix.lower() == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"sample_prompts={path}: not valid JSON ({e})") from None
        if not isinstance(entries, list):
            raise ValueError(f"sample_prompts={path}: expected a JSON list of prompt objects or prompt lines")
        entries = [_json_entry(entry, path) for entry in entries]
    else:
        entries = [_line_entry(line, path) for line in text.splitlines()
                   if line.strip() and not line.lstrip().startswith("#")]
    prompts = [_typed(entry, path) for entry in entries]
    if not prompts:
        raise ValueError(f"sample_prompts={path}: holds no prompt")
    return prompts


def _json_entry(entry, path: Path) -> dict:
    """A .json list item: an object, or a string read as a .txt line (sd-scripts' load_prompts)."""
    if isinstance(entry, str):
        return _line_entry(entry, path)
    if not isinstance(entry, dict):
        raise ValueError(f"sample_prompts={path}: expected a prompt object or a prompt line, got {entry!r}")
    return entry


def _line_entry(line: str, path: Path) -> dict:
    try:
        return _parse_line(line)
    except ValueError as e:
        raise ValueError(f"sample_prompts={path}: {e}") from None


def _parse_line(line: str) -> dict:
    """One .txt line as sd-scripts' ``line_to_prompt_dict`` reads it: flags in any case (``--W`` is ``--w``), ``--s``
    clamped to 1..1000. A numeric flag whose value sd-scripts would ignore (``--d -1``, ``--w abc``, ``--w`` at the
    end) is an error; ``--n`` or ``--ss`` without a value is left out, as there."""
    # sd-scripts splits at every " --"; a flag is a word alone, so "--n-dash" stays in the prompt
    parts = re.split(r"\s--(?=[a-z]+(?:\s|$))", " " + line.strip(), flags=re.IGNORECASE)
    entry = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        flag, _, value = part.partition(" ")
        flag, value = flag.lower(), value.strip()
        if flag not in _TXT_OPTIONS or not value and flag not in _TXT_VALUES:  # sd-scripts' "n (.+)" needs a value
            continue
        if flag in _TXT_VALUES:
            pattern, wanted = _TXT_VALUES[flag]
            match = re.match(pattern, value)  # a prefix, as sd-scripts' re.match: "--w 96px" is 96
            if not match:
                raise ValueError(f"bad value in {line.strip()!r}: --{flag} takes {wanted}, got {value!r} "
                                 "(sd-scripts would ignore the flag)")
            value = match.group(0)
            if flag == "s":
                value = max(1, min(_MAX_STEPS, int(value)))
        entry[_TXT_OPTIONS[flag]] = value
    return entry


def _typed(entry: dict, path: Path) -> SamplePrompt:
    unknown = sorted(set(entry) - set(_KINDS))
    if unknown:
        raise ValueError(f"sample_prompts={path}: unknown key {unknown[0]!r}; known: {', '.join(_KINDS)}")
    if not str(entry.get("prompt", "")).strip():
        raise ValueError(f"sample_prompts={path}: an entry has no prompt")
    try:
        values = {k: _KINDS[k](v) for k, v in entry.items()}
    except ValueError as e:
        raise ValueError(f"sample_prompts={path}: bad value in {entry!r}: {e}") from None
    steps = values.get("sample_steps")
    if steps is not None and not 1 <= steps <= _MAX_STEPS:  # .txt values are clamped already, as sd-scripts does
        raise ValueError(f"sample_prompts={path}: sample_steps must be 1..{_MAX_STEPS}, got {steps} (in {entry!r})")
    for side in ("width", "height"):  # sd-scripts: max(64, v - v % 8), so 60x70 draws 64x64
        if values.get(side) is not None:
            values[side] = max(64, values[side] - values[side] % 8)
    sampler = values.get("sample_sampler")
    if sampler is not None:  # checked now, not when the first sample is drawn mid-run
        from ..models.sample import check_sampler

        try:
            check_sampler(sampler)
        except ValueError as e:
            raise ValueError(f"sample_prompts={path}: {e} (in {entry!r})") from None
    return SamplePrompt(**values)


def draw_samples(model, prompts: list[SamplePrompt], folder: Path, output_name: str | None, step: int, *,
                 default_sampler: str, clip_skip: int | None, base_seed: int, write: bool = True,
                 epoch: int | None = None) -> list[tuple[str, object]]:
    """One image per prompt, named as sd-scripts' sample_image_inference names them:
    ``{output_name}_{step:06d}_{i:02d}_{time}_{seed}.png``, or ``{output_name}_e{epoch:06d}_...`` for a draw at an
    epoch's end or before training (``epoch`` given, 0 for sample_at_first); without output_name, no prefix.
    ``write`` False: drawn but not saved (a process that only takes part in a distributed forward). Returns each
    prompt's text and image (PIL), in the file's order, for the trackers."""
    from ..models.sample import generate

    if write:
        folder.mkdir(parents=True, exist_ok=True)
        for left in remove_stale_temporaries(folder):  # a killed run's half-written images
            logger.info("removed %s, left by a run that was stopped while saving", left)
    stamp = time.strftime("%Y%m%d%H%M%S")
    drawn = []
    for i, p in enumerate(prompts):
        seed = p.seed if p.seed is not None else base_seed + i
        image = generate(model, [p.prompt], negative_prompt=p.negative_prompt, steps=p.sample_steps,
                         guidance_scale=p.scale, width=p.width, height=p.height, seed=seed,
                         sampler=p.sample_sampler or default_sampler, clip_skip=clip_skip)[0]
        number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
        out = folder / f"{f'{output_name}_' if output_name else ''}{number}_{i:02d}_{stamp}_{seed}.png"
        if write:  # under a temporary name first: a killed run leaves no truncated image under its name
            atomic_write(out, lambda tmp, image=image: image.save(tmp, format="PNG"))
        drawn.append((p.prompt, image))
    return drawn
