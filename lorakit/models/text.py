"""Prompts -> U-Net conditioning, computed the way kohya sd-scripts computes it for training.

Token layout (``tokenize``): each prompt becomes ``n`` rows of 77 ids, n = 1 (max_token_length None or 75),
2 (150) or 3 (225). The prompt is tokenized once to 75n + 2 ids (<BOS>, up to 75n tokens, <EOS>, padding) and
cut into n chunks of 75 tokens, each wrapped as <BOS> chunk <last id>. With EOS padding (SD1, SDXL's first
tokenizer) that last id is always <EOS>. With ``!`` padding (SD2, SDXL's second) two fixes follow kohya: a chunk
whose 75th token is text ends in <EOS>, and a chunk that is all padding starts <BOS> <EOS>.

Conditioning (``encode_prompts``), per 77-id row, then the rows joined back:

* SD1/SD2: ``clip_skip`` None -> the encoder's last_hidden_state (after final_layer_norm); clip_skip k ->
  hidden_states[-k] through final_layer_norm (k = 1 is the same as None; k = 2 is the "penultimate layer").
  SD2 checkpoints load with 23 of OpenCLIP's 24 layers, so None already gives SD2's penultimate layer.
* SDXL: hidden_states[-2] of each encoder (kohya writes index 11 for ViT-L's 13 states, -2 for bigG), no final
  norm, concatenated along features (768 + 1280); ``clip_skip`` is ignored, as kohya ignores it for SDXL.
  pooled = text_projection(encoder 2's last_hidden_state at the first <EOS> of the first chunk): kohya's
  pool_workaround, which looks for <EOS> itself instead of trusting CLIP's argmax over ids.
* n > 1: <BOS> state of chunk 0, states 1..75 of every chunk, last state of the last chunk: 75n + 2 positions
  (77, 152, 227). kohya's SD2 code also meant to copy a padding state over an empty chunk's <EOS>, but its test
  compares an id with a string and never fires (and it is commented out for SDXL); we match what runs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["PromptEmbeds", "tokenize", "encode_prompts"]

CONTEXT = 77  # ids per encoder call: <BOS> + 75 + <EOS>/<PAD>
CHUNK = CONTEXT - 2
EOS_ID = 49407  # CLIP's <|endoftext|>, when no tokenizer says otherwise


@dataclass
class PromptEmbeds:
    """``hidden`` [B, S, D]: the U-Net's cross-attention context; ``pooled`` [B, P]: SDXL's text_embeds
    (None for SD1/SD2)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


def chunk_count(max_token_length: int | None) -> int:
    if max_token_length is None:
        return 1
    if max_token_length not in (75, 150, 225):
        raise ValueError(f"max_token_length must be None, 75, 150 or 225, not {max_token_length!r}")
    return max_token_length // CHUNK


def tokenize(tokenizer, prompts: str | Sequence[str], max_token_length: int | None = None) -> torch.Tensor:
    """Token ids [B, n, 77] for ``prompts`` (see the module docstring for the layout)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = chunk_count(max_token_length)
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=CHUNK * n + 2,
                    return_tensors="pt").input_ids
    if n == 1:
        return ids.unsqueeze(1)
    b = ids.shape[0]
    body = ids[:, 1:-1].reshape(b, n, CHUNK)
    chunks = torch.cat([ids[:, :1, None].expand(b, n, 1), body, ids[:, -1:, None].expand(b, n, 1)], dim=2)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad != eos:
        # "!"-padded: the last id of the long sequence is usually padding, so a full chunk needs its <EOS>
        # back, and an empty chunk gets one <EOS> after <BOS> (kohya's v2/SDXL rule).
        full = (chunks[:, :, -2] != eos) & (chunks[:, :, -2] != pad)
        chunks[:, :, -1] = torch.where(full, eos, chunks[:, :, -1])
        chunks[:, :, 1] = torch.where(chunks[:, :, 1] == pad, eos, chunks[:, :, 1])
    return chunks.contiguous()


def _transformer(encoder: torch.nn.Module) -> torch.nn.Module:
    """The module holding ``final_layer_norm``: transformers 5's CLIPTextModel is it; CLIPTextModelWithProjection
    (and transformers 4's CLIPTextModel) keep it under ``.text_model``."""
    return getattr(encoder, "text_model", encoder)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _join(hidden: torch.Tensor, n: int) -> torch.Tensor:
    """[B*n, 77, D] -> [B, 75n+2, D]: chunk 0's <BOS>, positions 1..75 of each chunk, the last chunk's last."""
    d = hidden.shape[-1]
    hidden = hidden.reshape(-1, n, CONTEXT, d)
    if n == 1:
        return hidden[:, 0]
    b = hidden.shape[0]
    return torch.cat([hidden[:, 0, :1], hidden[:, :, 1:-1].reshape(b, n * CHUNK, d), hidden[:, -1, -1:]], dim=1)


def _encode_one(encoder: torch.nn.Module, ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    """SD1/SD2 hidden states [B*n, 77, D] of one encoder."""
    if clip_skip is None:
        return encoder(ids, return_dict=True).last_hidden_state
    if clip_skip < 1:
        raise ValueError(f"clip_skip must be None or >= 1, not {clip_skip}")
    states = encoder(ids, output_hidden_states=True, return_dict=True).hidden_states
    if clip_skip >= len(states):
        raise ValueError(f"clip_skip {clip_skip} needs more than the {len(states) - 1} layers of this encoder")
    return _transformer(encoder).final_layer_norm(states[-clip_skip])


def _first_eos_pool(encoder: torch.nn.Module, last_hidden: torch.Tensor, ids: torch.Tensor, eos_id: int):
    """kohya's pool_workaround: the state at the first <EOS> of each row (row 0 position if none), projected."""
    index = (ids == eos_id).int().argmax(dim=1)
    pooled = last_hidden[torch.arange(last_hidden.shape[0], device=last_hidden.device), index]
    projection = encoder.text_projection
    return projection(pooled.to(projection.weight.dtype)).to(last_hidden.dtype)


def encode_prompts(model, prompts: Sequence[str], clip_skip: int | None = None,
                   max_token_length: int | None = None, input_ids=None) -> PromptEmbeds:
    """Conditioning of ``prompts`` for ``model`` (a ``StableDiffusionModel``), as kohya trains with it.

    ``input_ids``: ids from ``tokenize`` to use instead of tokenizing ``prompts`` — one [B, n, 77] tensor per
    text encoder (a list; a bare tensor is accepted for SD1/SD2). Gradients flow into the text encoders unless
    the caller runs this under ``torch.no_grad()``.
    """
    encoders = list(model.text_encoders)
    if input_ids is None:
        input_ids = [tokenize(tok, prompts, max_token_length) for tok in model.tokenizers]
    elif isinstance(input_ids, torch.Tensor):
        input_ids = [input_ids]
    if len(input_ids) != len(encoders):
        raise ValueError(f"{len(encoders)} text encoder(s) but {len(input_ids)} id tensor(s)")
    n = input_ids[0].shape[1]
    rows = [ids.reshape(-1, CONTEXT).to(_device(enc)) for ids, enc in zip(input_ids, encoders)]

    if not model.is_sdxl:
        return PromptEmbeds(_join(_encode_one(encoders[0], rows[0], clip_skip), n))

    if clip_skip is not None and clip_skip > 1:  # 1 is the last layer's output: no skip asked for
        warnings.warn(f"clip_skip {clip_skip} is ignored for SDXL (kohya sd-scripts ignores it too)", stacklevel=2)
    enc1, enc2 = encoders
    hidden1 = enc1(rows[0], output_hidden_states=True, return_dict=True).hidden_states[-2]
    out2 = enc2(rows[1], output_hidden_states=True, return_dict=True)
    hidden2 = out2.hidden_states[-2]
    eos_id = getattr(model.tokenizers[1], "eos_token_id", None) if model.tokenizers else None
    # Pool from the first chunk of each prompt only (kohya: pool2[::n]).
    pooled = _first_eos_pool(enc2, out2.last_hidden_state[::n], rows[1][::n], EOS_ID if eos_id is None else eos_id)
    hidden = torch.cat([_join(hidden1, n), _join(hidden2, n)], dim=-1)
    return PromptEmbeds(hidden, pooled)
