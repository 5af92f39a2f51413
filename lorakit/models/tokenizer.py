"""The CLIP tokenizers of Stable Diffusion, built offline from the files shipped in ``clip_tokenizer/``.

Every SD text encoder (SD1's CLIP ViT-L, SD2's OpenCLIP ViT-H, SDXL's ViT-L + ViT-bigG) uses the same
49 408-token BPE vocabulary; they differ only in the padding token. SD1 pads with ``<|endoftext|>`` (id 49407);
SD2 and SDXL's second tokenizer pad with ``!`` (id 0), as their published tokenizer configs and kohya
sd-scripts do. The padding matters: it changes the ids the encoder sees, hence the conditioning.

A ``!``-padded tokenizer also treats every ``!`` in a prompt as the special pad token, id 0 ("! !! !!!" ->
0 0 0 0 0 0, where OpenCLIP's own tokenizer gives 256 748 995). That is what diffusers and kohya sd-scripts feed
SD2/SDXL (their published tokenizers declare pad_token "!"; huggingface/diffusers#4153), so we keep it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

__all__ = ["MODEL_MAX_LENGTH", "PAD_EOS", "PAD_BANG", "clip_tokenizer", "tokenizers_for"]

MODEL_MAX_LENGTH = 77  # CLIP's context: <BOS> + 75 tokens + <EOS>
PAD_EOS = "<|endoftext|>"  # SD1 (and SDXL's first tokenizer)
PAD_BANG = "!"  # SD2 and SDXL's second tokenizer: id 0


@lru_cache(maxsize=1)
def _files() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The vocabulary and merges, parsed once per process (the tokenizer objects themselves are not shared)."""
    folder = resources.files("lorakit.models") / "clip_tokenizer"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1:] if line)  # line 0: "#version: 0.2"
    return vocab, merges


def clip_tokenizer(pad_token: str = PAD_EOS):
    """A new ``transformers.CLIPTokenizer`` (model_max_length 77) padding with ``pad_token``.

    A fresh object each call (~60 ms): tokenizers are mutable (textual inversion adds tokens, callers set
    ``pad_token``), so sharing one would leak such changes between models. Only the parsed files are cached.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _files()
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the CLIP vocabulary")
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token,
                         model_max_length=MODEL_MAX_LENGTH)


def tokenizers_for(kind: str) -> list:
    """The tokenizers of a model kind, in pipeline order: sd1 -> [EOS-padded]; sd2 -> [``!``-padded];
    sdxl -> [EOS-padded, ``!``-padded]."""
    pads = {"sd1": [PAD_EOS], "sd2": [PAD_BANG], "sdxl": [PAD_EOS, PAD_BANG]}
    if kind not in pads:
        raise ValueError(f"model kind {kind!r} is not one of {', '.join(pads)}")
    return [clip_tokenizer(pad) for pad in pads[kind]]
