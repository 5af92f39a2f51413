"""Captions: reading caption files, and turning a caption into the text of one training step.

``process_caption`` follows kohya sd-scripts' ``BaseDataset.process_caption`` step for step, and draws its
random numbers in the same order from the ``random.Random`` it is given (kohya uses the global ``random``), so
with equal generator states both give the same text:

1. ``caption_prefix`` + " " + caption + " " + ``caption_suffix``.
2. Dropped entirely (""): with probability ``caption_dropout_rate`` (one draw, only when the rate is > 0), or
   on every epoch divisible by ``caption_dropout_every_n_epochs`` (epochs count from 1).
3. Multi-line captions: one line drawn at random with ``enable_wildcard`` (then ``{a|b}`` picks one option,
   ``{{``/``}}`` are literal braces), else the first line.
4. With ``shuffle_caption`` or ``caption_tag_dropout_rate``: split on ``caption_separator`` into tags (stripped);
   the first ``keep_tokens`` tags stay in front, or, when ``keep_tokens_separator`` occurs in the caption, the
   part before it stays in front and the part after a second occurrence stays at the end; the other tags are
   shuffled, then each is dropped with probability ``caption_tag_dropout_rate``; tags are joined with ", ".
   With ``token_warmup_step`` (steps, or below 1 a ratio of ``max_train_steps``), before the shuffle only the
   first floor(step * ((n - token_warmup_min) / token_warmup_step)) + ``token_warmup_min`` of the n shuffled tags
   are kept, until that step (sd-scripts' caption tag warmup; ``step``: the optimizer steps done so far).
5. ``secondary_separator`` is replaced by ``caption_separator`` (it joins tags that move as one).
"""

from __future__ import annotations

import math
import os
import random
import re

from .errors import DatasetError
from .spec import CaptionOptions

__all__ = ["read_caption_file", "caption_for_image", "process_caption", "warmup_steps"]


def read_caption_file(path: str, *, all_lines: bool = False) -> str:
    """The caption in ``path``: its first line, stripped (``all_lines``: the non-blank lines joined by "\\n", for
    wildcard captions). UTF-8, with or without a byte-order mark; anything else is an error naming the file."""
    try:
        data = open(path, "rb").read()
    except OSError as e:
        raise DatasetError(f"{path}: caption file cannot be read ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: caption file is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                           f"{e.start}); save it as UTF-8") from None
    # Only \n, \r and \r\n end a line, as in sd-scripts' text-mode readlines(); str.splitlines() would also cut
    # at U+2028, U+0085, form feeds and vertical tabs, which text pasted from web pages and PDFs carries.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if not text:
        raise DatasetError(f"{path}: caption file is empty (write the caption, or delete the file to use the "
                           "folder's class tokens)")
    if all_lines:
        return "\n".join(line.strip() for line in lines if line.strip())
    return lines[0].strip()


def caption_for_image(image_path: str, extension: str, *, all_lines: bool = False) -> str | None:
    """The caption file next to ``image_path`` (same name, ``extension``), or None when there is none."""
    path = os.path.splitext(image_path)[0] + extension
    return read_caption_file(path, all_lines=all_lines) if os.path.isfile(path) else None


def _wildcards(caption: str, rng: random.Random) -> str:
    open_mark, close_mark = "⦅", "⦆"
    while open_mark in caption or close_mark in caption:
        open_mark, close_mark = open_mark + "⦅", close_mark + "⦆"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def _split_tags(text: str, separator: str) -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


def warmup_steps(options: CaptionOptions, max_train_steps: int) -> float:
    """token_warmup_step in steps: a value below 1 is a ratio of ``max_train_steps`` (floored, as sd-scripts);
    from 1 on the value itself, a fraction kept (sd-scripts divides by the float 2.5 as given)."""
    value = options.token_warmup_step
    return math.floor(value * max_train_steps) if value < 1 else value


def process_caption(caption: str, options: CaptionOptions, rng: random.Random, epoch: int, step: int = 0,
                    max_train_steps: int = 0) -> str:
    """The text trained on for ``caption`` at ``epoch`` (1-based) and optimizer ``step`` (0-based, for the
    token warmup), drawing from ``rng`` (see the module doc)."""
    o = options
    if o.caption_prefix:
        caption = o.caption_prefix + " " + caption
    if o.caption_suffix:
        caption = caption + " " + o.caption_suffix

    dropped = o.caption_dropout_rate > 0 and rng.random() < o.caption_dropout_rate
    dropped = dropped or (o.caption_dropout_every_n_epochs > 0 and epoch % o.caption_dropout_every_n_epochs == 0)
    if dropped:
        return ""

    if o.enable_wildcard:
        if "\n" in caption:
            caption = rng.choice(caption.split("\n"))
        caption = _wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    if o.shuffle_caption or o.caption_tag_dropout_rate > 0 or o.token_warmup_step > 0:
        sep = o.caption_separator
        fixed, suffix = [], []
        if o.keep_tokens_separator and o.keep_tokens_separator in caption:
            fixed_part, flex_part = caption.split(o.keep_tokens_separator, 1)
            if o.keep_tokens_separator in flex_part:
                flex_part, suffix_part = flex_part.split(o.keep_tokens_separator, 1)
                suffix = _split_tags(suffix_part, sep)
            fixed, flex = _split_tags(fixed_part, sep), _split_tags(flex_part, sep)
        else:
            flex = [t.strip() for t in caption.strip().split(sep)]  # empty tags kept, as kohya keeps them
            if o.keep_tokens > 0:
                fixed, flex = flex[: o.keep_tokens], flex[o.keep_tokens:]
        warmup = warmup_steps(o, max_train_steps) if o.token_warmup_step > 0 else 0
        if warmup and step < warmup:
            # sd-scripts' order of operations: the share per step first, then times the step (float rounding)
            flex = flex[: math.floor(step * ((len(flex) - o.token_warmup_min) / warmup)) + o.token_warmup_min]
        if o.shuffle_caption:
            rng.shuffle(flex)
        if o.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= o.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + suffix)

    if o.secondary_separator:
        caption = caption.replace(o.secondary_separator, o.caption_separator)
    return caption
