"""Weighted captions: "(black:1.2) cat" -> token ids and one weight per token, in A1111's prompt syntax, as
kohya sd-scripts trains with ``weighted_captions``.

Syntax (A1111 / kohya ``parse_prompt_attention``): ``(x)`` multiplies the weight of x by 1.1, ``[x]`` divides it
by 1.1, ``(x:w)`` multiplies it by w; brackets nest (weights multiply); an unclosed ``(`` or ``[`` applies to the
rest of the prompt; a stray ``)`` or ``]`` is plain text; ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are literal
characters (a lone backslash vanishes). Neighbouring pieces of equal weight are merged. Spaces around an explicit
weight ("(x: 1.2 )") are allowed as in A1111's current parser; kohya's copy of the older one reads that as text.

Tokens (``tokenize_weighted``): each piece is tokenized on its own (so a word never spans two weights), the
pieces' tokens joined and cut to 75 n; then laid out in the same [B, n, 77] rows as
``lorakit.models.text.tokenize``, each row <BOS> 75 tokens <EOS>/<PAD>, and the weights in the same layout
(1.0 at <BOS>, <EOS> and padding). ``apply_token_weights`` multiplies the text encoder's hidden states by them,
as kohya does (no renormalisation of the mean).
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

from ..models.text import chunk_count

__all__ = ["parse_prompt_attention", "strip_weights", "tokenize_weighted", "apply_token_weights"]

UP, DOWN = 1.1, 1 / 1.1
CHUNK = 75

_TOKEN = re.compile(r"""
    \\[()\[\]\\]          # escaped bracket or backslash: a literal character
  | \\                    # a lone backslash: itself
  | [(\[]                 # opening bracket
  | :\s*([+-]?[.\d]+)\s*\)  # ":weight)" closes a round bracket with an explicit weight
  | [)\]]                 # closing bracket
  | [^\\()\[\]:]+         # plain text
  | :                     # a colon that is not a weight
""", re.X)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """[(text, weight), ...] for a prompt in A1111's syntax (see the module doc)."""
    pieces: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])  # a lone backslash escapes nothing and vanishes (A1111, kohya)
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                raise ValueError(f"prompt {text!r}: weight {weight!r} is not a number") from None
            scale_from(round_open.pop(), factor)
        elif token == ")" and round_open:
            scale_from(round_open.pop(), UP)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), DOWN)
        else:
            pieces.append([token, 1.0])
    for start in round_open:
        scale_from(start, UP)
    for start in square_open:
        scale_from(start, DOWN)

    merged: list[list] = []
    for piece in pieces:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged] or [("", 1.0)]


def strip_weights(text: str) -> str:
    """The prompt without its weight syntax ("(black:1.2) cat" -> "black cat")."""
    return "".join(t for t, _ in parse_prompt_attention(text))


def _one(tokenizer, prompt: str, n: int) -> tuple[list[list[int]], list[list[float]]]:
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in parse_prompt_attention(prompt):
        piece = tokenizer(text).input_ids[1:-1]  # without <BOS>/<EOS>
        ids += piece
        weights += [weight] * len(piece)
    ids, weights = ids[: CHUNK * n], weights[: CHUNK * n]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    # The long row <BOS> tokens <EOS> <PAD>..., 75n + 2 ids, cut into chunks as text.tokenize cuts it.
    row = [bos] + ids + [eos] + [pad] * (CHUNK * n - len(ids))
    row_weights = [1.0] + weights + [1.0] * (CHUNK * n + 1 - len(weights))
    out_ids, out_weights = [], []
    for c in range(n):
        body = row[1 + CHUNK * c: 1 + CHUNK * (c + 1)]
        chunk = [bos] + body + [row[-1]]
        if n > 1 and pad != eos:
            # "!"-padded tokenizers: a chunk full of text ends in <EOS>; an empty chunk starts <BOS> <EOS>.
            if chunk[-2] not in (eos, pad):
                chunk[-1] = eos
            if chunk[1] == pad:
                chunk[1] = eos
        out_ids.append(chunk)
        out_weights.append([1.0] + row_weights[1 + CHUNK * c: 1 + CHUNK * (c + 1)] + [1.0])
    return out_ids, out_weights


def tokenize_weighted(tokenizer, prompts: str | Sequence[str],
                      max_token_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, n, 77] long, weights [B, n, 77] float32) for prompts in A1111's weight syntax."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = chunk_count(max_token_length)
    rows = [_one(tokenizer, p, n) for p in prompts]
    ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
    weights = torch.tensor([r[1] for r in rows], dtype=torch.float32)
    return ids, weights


def apply_token_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Hidden states [B, 75n + 2, D] (``encode_prompts``' layout) times the weights [B, n, 77] of their tokens."""
    b, n, _ = weights.shape
    if hidden.shape[1] != CHUNK * n + 2:
        raise ValueError(f"hidden states of {hidden.shape[1]} positions do not match {n} chunk(s) of weights "
                         f"({CHUNK * n + 2} positions expected)")
    # Position 0 is chunk 0's <BOS>, 1..75n the chunks' tokens, the last one the last chunk's <EOS>/<PAD>.
    per_position = torch.cat([weights[:, 0, :1], weights[:, :, 1:-1].reshape(b, n * CHUNK), weights[:, -1, -1:]],
                             dim=1)
    return hidden * per_position.to(hidden.dtype).unsqueeze(-1)
