"""Caption processing against hand-worked kohya examples and a transliteration of kohya's process_caption
(which draws from the global ``random``); caption files with their named errors."""

from __future__ import annotations

import math
import random

import pytest

from lorakit.data.captions import caption_for_image, process_caption, read_caption_file
from lorakit.data.errors import DatasetError
from lorakit.data.spec import CaptionOptions


def kohya_process_caption(o, caption, epoch):
    """sd-scripts BaseDataset.process_caption (no wildcard/token warmup/replacements), on the global random."""
    if o.caption_prefix:
        caption = o.caption_prefix + " " + caption
    if o.caption_suffix:
        caption = caption + " " + o.caption_suffix
    is_drop_out = o.caption_dropout_rate > 0 and random.random() < o.caption_dropout_rate
    is_drop_out = is_drop_out or o.caption_dropout_every_n_epochs > 0 and epoch % o.caption_dropout_every_n_epochs == 0
    if is_drop_out:
        return ""
    caption = caption.split("\n")[0]
    if o.shuffle_caption or o.caption_tag_dropout_rate > 0:
        fixed_tokens, flex_tokens, fixed_suffix_tokens = [], [], []
        if o.keep_tokens_separator and o.keep_tokens_separator in caption:
            fixed_part, flex_part = caption.split(o.keep_tokens_separator, 1)
            if o.keep_tokens_separator in flex_part:
                flex_part, fixed_suffix_part = flex_part.split(o.keep_tokens_separator, 1)
                fixed_suffix_tokens = [t.strip() for t in fixed_suffix_part.split(o.caption_separator) if t.strip()]
            fixed_tokens = [t.strip() for t in fixed_part.split(o.caption_separator) if t.strip()]
            flex_tokens = [t.strip() for t in flex_part.split(o.caption_separator) if t.strip()]
        else:
            tokens = [t.strip() for t in caption.strip().split(o.caption_separator)]
            flex_tokens = tokens[:]
            if o.keep_tokens > 0:
                fixed_tokens = flex_tokens[: o.keep_tokens]
                flex_tokens = tokens[o.keep_tokens:]

        def dropout_tags(tokens):
            if o.caption_tag_dropout_rate <= 0:
                return tokens
            return [t for t in tokens if random.random() >= o.caption_tag_dropout_rate]

        if o.shuffle_caption:
            random.shuffle(flex_tokens)
        flex_tokens = dropout_tags(flex_tokens)
        caption = ", ".join(fixed_tokens + flex_tokens + fixed_suffix_tokens)
    if o.secondary_separator:
        caption = caption.replace(o.secondary_separator, o.caption_separator)
    return caption


CAPTIONS = ["sks dog, sitting, grass, blue sky, sunny, tree", "a, b ,c,, d,", "solo ||| red hair, smile ||| masterpiece",
            "one", "x; y; z\nsecond line", "long hair^^braid, blue eyes, looking at viewer",
            "1girl, solo, ||| red hair, , smile, ||| , masterpiece"]  # empty tags around the separators: dropped
OPTIONS = [
    CaptionOptions(shuffle_caption=True),
    CaptionOptions(shuffle_caption=True, keep_tokens=2),
    CaptionOptions(caption_tag_dropout_rate=0.3),
    CaptionOptions(shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.5, caption_dropout_rate=0.2),
    CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||"),
    CaptionOptions(shuffle_caption=True, caption_separator=";", caption_prefix="pre", caption_suffix="suf"),
    CaptionOptions(shuffle_caption=True, secondary_separator="^^", caption_dropout_every_n_epochs=3),
    CaptionOptions(),
]


@pytest.mark.parametrize("options", OPTIONS)
def test_matches_kohya_draw_for_draw(options):
    for seed in range(40):
        for epoch in (1, 2, 3):
            for caption in CAPTIONS:
                random.seed(seed)
                expected = kohya_process_caption(options, caption, epoch)
                after_kohya = random.random()
                rng = random.Random(seed)
                assert process_caption(caption, options, rng, epoch) == expected, (caption, seed, epoch)
                assert rng.random() == after_kohya  # the same number of draws


def test_hand_examples():
    rng = random.Random(0)
    # No shuffle or tag dropout: the caption is untouched (only its first line is used).
    assert process_caption("b, a\nignored", CaptionOptions(keep_tokens=1), rng, 1) == "b, a"
    # keep_tokens keeps the leading tags in place whatever the shuffle does; tags are joined by ", ".
    out = process_caption("sks, dog,grass,sky", CaptionOptions(shuffle_caption=True, keep_tokens=2), rng, 1)
    assert out.startswith("sks, dog, ") and sorted(out.split(", ")[2:]) == ["grass", "sky"]
    # keep_tokens_separator: a fixed head and a fixed tail.
    o = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||")
    out = process_caption("a, b ||| c, d, e ||| f, g", o, rng, 1)
    assert out.startswith("a, b, ") and out.endswith(", f, g") and sorted(out.split(", ")[2:5]) == ["c", "d", "e"]
    # Dropout every 2nd epoch: epochs count from 1, so epoch 2 and 4 are empty.
    o = CaptionOptions(caption_dropout_every_n_epochs=2)
    assert [process_caption("x", o, rng, e) for e in (1, 2, 3, 4)] == ["x", "", "x", ""]
    # Full tag dropout keeps only the kept tokens; full caption dropout gives "".
    assert process_caption("a, b, c", CaptionOptions(keep_tokens=1, caption_tag_dropout_rate=1.0), rng, 1) == "a"
    assert process_caption("a, b, c", CaptionOptions(caption_dropout_rate=1.0), rng, 1) == ""
    # Wildcards: one option per brace, doubled braces are literal.
    o = CaptionOptions(enable_wildcard=True)
    assert process_caption("{{x}} {red|red} cat", o, rng, 1) == "{x} red cat"


def test_statistics_of_tag_dropout():
    o = CaptionOptions(caption_tag_dropout_rate=0.25)
    rng = random.Random(5)
    kept = sum(len(process_caption("a, b, c, d", o, rng, 1).split(", ")) for _ in range(4000))
    assert math.isclose(kept / 16000, 0.75, abs_tol=0.02)


def _sd_scripts_warmup_count(step, n, low, warmup, max_train_steps):
    """sd-scripts process_caption: a warmup below 1 is floored to steps, anything else is divided by as given."""
    if warmup < 1:
        warmup = math.floor(warmup * max_train_steps)
    if warmup and step < warmup:
        return math.floor(step * ((n - low) / warmup)) + low
    return n


@pytest.mark.parametrize("n, warmup, max_train_steps", [(11, 2.5, 100), (31, 22, 0), (9, 0.5, 9), (6, 4, 0)])
def test_token_warmup_follows_sd_scripts_arithmetic(n, warmup, max_train_steps):
    """A fractional token_warmup_step of 1 or more stays a float (2.5, not 2); the share of tags per step is computed
    before multiplying by the step, as sd-scripts does (11 * (30 / 22) is 14.999..., not 15)."""
    tags = [f"t{i}" for i in range(n)]
    options = CaptionOptions(token_warmup_min=1, token_warmup_step=warmup)
    for step in range(math.ceil(warmup if warmup >= 1 else warmup * max_train_steps) + 1):
        text = process_caption(", ".join(tags), options, random.Random(0), 1, step, max_train_steps)
        assert text.split(", ") == tags[: _sd_scripts_warmup_count(step, n, 1, warmup, max_train_steps)], step


def test_caption_files(tmp_path):
    (tmp_path / "a.txt").write_text("first line, tags \nsecond\n", encoding="utf-8")
    assert caption_for_image(str(tmp_path / "a.png"), ".txt") == "first line, tags"
    assert caption_for_image(str(tmp_path / "a.png"), ".txt", all_lines=True) == "first line, tags\nsecond"
    assert caption_for_image(str(tmp_path / "a.png"), ".caption") is None
    (tmp_path / "bom.txt").write_bytes("\ufeffcafé".encode("utf-8"))
    assert read_caption_file(str(tmp_path / "bom.txt")) == "café"


def test_only_newlines_end_a_caption_line(tmp_path):
    """As sd-scripts' readlines(): CR, LF and CRLF end lines; U+2028, U+0085, form feed, vertical tab do not."""
    (tmp_path / "u.txt").write_text("a photo of sks\u2028 dog\x85 red\x0cx\x0by\r\nsecond\rthird",
                                    encoding="utf-8", newline="")
    assert read_caption_file(str(tmp_path / "u.txt")) == "a photo of sks\u2028 dog\x85 red\x0cx\x0by"
    assert read_caption_file(str(tmp_path / "u.txt"), all_lines=True).split("\n")[1:] == ["second", "third"]


def test_caption_in_wrong_encoding(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("un café".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin\.txt: caption file is not UTF-8 text \(byte 0xe9 at offset 6\)"):
        read_caption_file(str(path))


def test_empty_caption_file(tmp_path):
    (tmp_path / "e.txt").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"e\.txt: caption file is empty"):
        read_caption_file(str(tmp_path / "e.txt"))
    # sd-scripts refuses a file without lines only (assert len(lines) > 0): a blank line is the empty caption
    (tmp_path / "blank.txt").write_bytes(b" \n")
    assert read_caption_file(str(tmp_path / "blank.txt")) == ""


@pytest.mark.parametrize("options, message", [
    (dict(caption_dropout_rate=1.5), "caption_dropout_rate must be between 0 and 1"),
    (dict(caption_tag_dropout_rate=-0.1), "caption_tag_dropout_rate must be between 0 and 1"),
    (dict(keep_tokens=-1), "keep_tokens must be a whole number"),
    (dict(num_repeats=-1), "num_repeats must be a whole number >= 0"),
])
def test_bad_subset_options(options, message):
    from lorakit.data.spec import SubsetSpec

    with pytest.raises(DatasetError, match=message):
        SubsetSpec(image_dir="x", **options)
