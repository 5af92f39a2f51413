"""The shipped CLIP tokenizer against an independent re-implementation of OpenAI CLIP's SimpleTokenizer."""

from __future__ import annotations

import json
import unicodedata
from importlib import resources

import pytest

from lorakit.models.tokenizer import clip_tokenizer, tokenizers_for

regex = pytest.importorskip("regex")

FOLDER = resources.files("lorakit.models") / "clip_tokenizer"
BOS, EOS = 49406, 49407


# --- reference: written from OpenAI CLIP's clip/simple_tokenizer.py description, not from transformers ----------

def byte_symbols() -> dict[int, str]:
    """Printable bytes stand for themselves; the other 68, in byte order, take code points 256, 257, ...
    Dict order (printable first) is the order of the first 256 vocabulary entries."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def read_merges() -> list[tuple[str, str]]:
    lines = (FOLDER / "merges.txt").read_text(encoding="utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1:] if line]


class SimpleTokenizer:
    PAT = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
                        regex.IGNORECASE)

    def __init__(self, merges):
        self.bytes = byte_symbols()
        symbols = list(self.bytes.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}

    def bpe(self, token: str) -> list[str]:
        if token in ("<|startoftext|>", "<|endoftext|>"):
            return [token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        # ftfy.fix_text's part that matters here is NFC; then whitespace_clean and lower()
        text = " ".join(unicodedata.normalize("NFC", text).split()).lower()
        ids = []
        for piece in regex.findall(self.PAT, text):
            mapped = "".join(self.bytes[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(mapped)]
        return ids


@pytest.fixture(scope="module")
def reference():
    return SimpleTokenizer(read_merges())


def reference_ids(reference: SimpleTokenizer, text: str, pad_token: str = "<|endoftext|>") -> list[int]:
    """Ids between <BOS> and <EOS>. A "!"-padded transformers tokenizer cuts the text at every "!" (its special pad
    token, id 0) before anything else; each piece is then tokenized on its own."""
    if pad_token != "!":
        return reference.encode(text)
    ids = []
    for i, piece in enumerate(text.split("!")):
        ids += ([0] if i else []) + reference.encode(piece)
    return ids


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


PROMPTS = [
    "a photo of a cat",
    "(red:1.2), [blue], {green}, ((masterpiece)), (cat:0.8) AND dog",
    "Hello,WORLD!!! what's up? isn't it... they'll've -- 'quoted' \"double\" <tag> a/b\\c #1 @x $5 100% ~tilde",
    "numbers 12345 3.14159 1e-5 2024-01-01 0x1F",
    "café naïve résumé Ångström",
    "cafe\u0301 composed by NFC",
    "日本語のテキスト 中文 한국어 русский текст",
    "emoji 😀🎉👍🏽 and ♥ ★ ™ ©",
    "  lots   of\twhite\nspace  \r\n ",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "UPPER lower MiXeD",
    "a <|endoftext|> b",
]


def test_vocab_is_rebuilt_from_merges(reference):
    vocab = json.loads((FOLDER / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == reference.encoder
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    assert vocab["!"] == 0


TOKENIZERS = {pad: clip_tokenizer(pad) for pad in ("<|endoftext|>", "!")}


def test_anchors(tok):
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.model_max_length == 77 and tok.bos_token_id == BOS and tok.eos_token_id == EOS
    assert len(tok) == 49408


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_same_ids_as_reference(reference, prompt, pad_token):
    tok = TOKENIZERS[pad_token]
    assert tok(prompt).input_ids == [BOS, *reference_ids(reference, prompt, pad_token), EOS]


def test_exclamation_marks():
    # OpenCLIP's ids for "! !! !!!" and what the "!"-padded HF tokenizer makes of them (diffusers#4153)
    assert TOKENIZERS["<|endoftext|>"]("! !! !!!").input_ids == [BOS, 256, 748, 995, EOS]
    assert TOKENIZERS["!"]("! !! !!!").input_ids == [BOS, 0, 0, 0, 0, 0, 0, EOS]


@pytest.mark.parametrize("pad_token, pad_id", [("<|endoftext|>", EOS), ("!", 0)])
def test_truncation_and_padding(reference, pad_token, pad_id):
    tok = clip_tokenizer(pad_token)
    assert tok.pad_token_id == pad_id
    long = ", ".join(PROMPTS * 3)
    ref = reference_ids(reference, long, pad_token)
    assert len(ref) > 200
    ids = tok(long, padding="max_length", truncation=True, max_length=77).input_ids
    assert ids == [BOS, *ref[:75], EOS]
    short = tok("a photo of a cat", padding="max_length", truncation=True, max_length=77).input_ids
    assert short == [BOS, 320, 1125, 539, 320, 2368, EOS] + [pad_id] * 70


def test_tokenizers_for():
    assert [t.pad_token_id for t in tokenizers_for("sd1")] == [EOS]
    assert [t.pad_token_id for t in tokenizers_for("sd2")] == [0]
    assert [t.pad_token_id for t in tokenizers_for("sdxl")] == [EOS, 0]
    with pytest.raises(ValueError, match="sd3"):
        tokenizers_for("sd3")
    with pytest.raises(ValueError, match="not in the CLIP vocabulary"):
        clip_tokenizer("<pad>")


def test_objects_are_not_shared():
    a, b = clip_tokenizer(), clip_tokenizer()
    a.add_tokens(["<my-embedding>"])
    assert len(a) == 49409 and len(b) == 49408 and len(clip_tokenizer()) == 49408
