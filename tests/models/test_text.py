"""Prompt -> conditioning against hand-written id layouts and a direct float64 computation with the encoders."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from lorakit.models.model import StableDiffusionModel  # noqa: E402
from lorakit.models.text import encode_prompts, tokenize  # noqa: E402
from lorakit.models.tokenizer import tokenizers_for  # noqa: E402

BOS, EOS, A = 49406, 49407, 320  # "a" is one token, so "a a a ..." makes k tokens
PROMPTS = ["a photo of a cat, (red:1.2)", "dog"]


def a_times(k: int) -> str:
    return " ".join(["a"] * k)


# --- token layouts ------------------------------------------------------------------------------------------------

def chunk(*parts):
    row = [x for p in parts for x in (p if isinstance(p, list) else [p])]
    assert len(row) == 77
    return row


@pytest.mark.parametrize("k, length, expected", [
    # EOS padding (SD1, SDXL's first tokenizer): every chunk ends in EOS, padding is EOS
    (10, 150, [chunk(BOS, [A] * 10, [EOS] * 66), chunk(BOS, [EOS] * 76)]),
    (80, 150, [chunk(BOS, [A] * 75, EOS), chunk(BOS, [A] * 5, [EOS] * 71)]),
    (300, 225, [chunk(BOS, [A] * 75, EOS)] * 3),
])
def test_layout_eos_padding(k, length, expected):
    ids = tokenize(tokenizers_for("sd1")[0], [a_times(k)], length)
    assert ids.shape == (1, len(expected), 77) and ids.dtype == torch.long
    assert ids[0].tolist() == expected


@pytest.mark.parametrize("k, length, expected", [
    # "!" padding (SD2, SDXL's second tokenizer): a full chunk gets EOS, an empty one BOS EOS ! ...
    (10, 150, [chunk(BOS, [A] * 10, EOS, [0] * 65), chunk(BOS, EOS, [0] * 75)]),
    (10, 225, [chunk(BOS, [A] * 10, EOS, [0] * 65), chunk(BOS, EOS, [0] * 75), chunk(BOS, EOS, [0] * 75)]),
    (75, 150, [chunk(BOS, [A] * 75, EOS), chunk(BOS, EOS, [0] * 75)]),
    (76, 150, [chunk(BOS, [A] * 75, EOS), chunk(BOS, A, EOS, [0] * 74)]),
    (149, 150, [chunk(BOS, [A] * 75, EOS), chunk(BOS, [A] * 74, EOS, 0)]),
    (150, 150, [chunk(BOS, [A] * 75, EOS)] * 2),
    (300, 225, [chunk(BOS, [A] * 75, EOS)] * 3),
])
def test_layout_bang_padding(k, length, expected):
    ids = tokenize(tokenizers_for("sd2")[0], [a_times(k)], length)
    assert ids[0].tolist() == expected


def test_layout_single_chunk():
    tok = tokenizers_for("sd2")[0]
    expected = [chunk(BOS, [A] * 3, EOS, [0] * 72)]
    for length in (None, 75):
        ids = tokenize(tok, [a_times(3), a_times(100)], length)
        assert ids.shape == (2, 1, 77)
        assert ids[0].tolist() == expected and ids[1].tolist() == [chunk(BOS, [A] * 75, EOS)]
    assert tokenize(tok, "a a a").tolist() == [expected]
    with pytest.raises(ValueError, match="max_token_length"):
        tokenize(tok, ["a"], 100)
    # sd-scripts' --max_token_length choices are None, 75, 150, 225: a fourth chunk is refused, not encoded
    with pytest.raises(ValueError, match="max_token_length"):
        tokenize(tok, ["a"], 300)


# --- encoders -----------------------------------------------------------------------------------------------------

def clip(layers: int, width: int, projection: bool, seed: int, vocab: int = 49408):
    config = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                                         num_hidden_layers=layers, num_attention_heads=4,
                                         max_position_embeddings=77, projection_dim=16)
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).double().eval()


@pytest.fixture(scope="module")
def models():
    te1 = clip(3, 32, False, 0)
    te2 = clip(2, 24, True, 1)
    make = lambda kind, tes: StableDiffusionModel(kind, False, None, None, tes, tokenizers_for(kind), {})  # noqa: E731
    return {"sd1": make("sd1", [te1]), "sd2": make("sd2", [clip(2, 32, False, 2)]), "sdxl": make("sdxl", [te1, te2])}


def plain_ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids


def final_norm(encoder, x):
    ln = getattr(encoder, "text_model", encoder).final_layer_norm
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_sd_matches_direct_computation(models, kind):
    model = models[kind]
    te, ids = model.text_encoders[0], plain_ids(model.tokenizers[0], PROMPTS)
    with torch.no_grad():
        states = te(ids, output_hidden_states=True).hidden_states  # embeddings + one per layer
        layers = len(states) - 1
        expected = {None: final_norm(te, states[layers]), 1: final_norm(te, states[layers]),
                    2: final_norm(te, states[layers - 1])}
        for clip_skip, want in expected.items():
            got = encode_prompts(model, PROMPTS, clip_skip=clip_skip)
            assert got.pooled is None and got.hidden.shape == (2, 77, 32)
            torch.testing.assert_close(got.hidden, want, rtol=1e-12, atol=1e-12)
        assert not torch.equal(expected[1], expected[2])
    with pytest.raises(ValueError, match="clip_skip"):
        encode_prompts(model, PROMPTS, clip_skip=0)


def test_sdxl_matches_direct_computation(models):
    model = models["sdxl"]
    (te1, te2), (tok1, tok2) = model.text_encoders, model.tokenizers
    ids1, ids2 = plain_ids(tok1, PROMPTS), plain_ids(tok2, PROMPTS)
    assert ids2[1, 3:].eq(0).all() and ids1[1, 3:].eq(EOS).all()  # "dog": the two encoders see different pads
    with torch.no_grad():
        s1 = te1(ids1, output_hidden_states=True).hidden_states
        out2 = te2(ids2, output_hidden_states=True)
        s2 = out2.hidden_states
        want_hidden = torch.cat([s1[len(s1) - 2], s2[len(s2) - 2]], dim=-1)  # penultimate of each, no final norm
        last2 = final_norm(te2, s2[-1])
        eos_at = [row.index(EOS) for row in ids2.tolist()]
        want_pooled = torch.stack([last2[b, i] for b, i in enumerate(eos_at)]) @ te2.text_projection.weight.T
        got = encode_prompts(model, PROMPTS)
    assert got.hidden.shape == (2, 77, 56) and got.pooled.shape == (2, 16)
    torch.testing.assert_close(got.hidden, want_hidden, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.pooled, want_pooled, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.pooled, out2.text_embeds, rtol=1e-12, atol=1e-12)  # transformers agrees here
    with pytest.warns(UserWarning, match="clip_skip 2 is ignored for SDXL"):
        skipped = encode_prompts(model, PROMPTS, clip_skip=2)
    assert torch.equal(skipped.hidden, got.hidden)
    with warnings.catch_warnings():  # clip_skip 1 (the kohya_ss GUI's default) asks for no skip: nothing to say
        warnings.simplefilter("error")
        assert torch.equal(encode_prompts(model, PROMPTS, clip_skip=1).hidden, got.hidden)


def kohya_join(hidden, n):
    """kohya's recombination, written out: <BOS> of chunk 0, then for i = 1, 78, 155 ... positions i..i+74 of the
    [B, n*77, D] states, then the very last state."""
    parts = [hidden[:, 0:1]]
    for i in range(1, n * 77, 77):
        parts.append(hidden[:, i:i + 75])
    parts.append(hidden[:, -1:])
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("length", [150, 225])
def test_long_prompts_match_kohya_recombination(models, kind, length):
    model = models[kind]
    n = length // 75
    prompts = [a_times(100) + ", a photo of a cat", "dog"]  # two full-ish chunks, and one nearly empty prompt
    ids = [tokenize(tok, prompts, length) for tok in model.tokenizers]
    with torch.no_grad():
        outs = [te(i.reshape(-1, 77), output_hidden_states=True) for te, i in zip(model.text_encoders, ids)]
        if kind == "sdxl":
            want = torch.cat([kohya_join(o.hidden_states[-2].reshape(2, n * 77, -1), n) for o in outs], dim=-1)
            eos_at = ids[1].reshape(-1, 77).eq(EOS).int().argmax(dim=1)
            rows = torch.arange(2 * n)
            pooled_all = outs[1].last_hidden_state[rows, eos_at] @ model.text_encoders[1].text_projection.weight.T
            want_pooled = pooled_all[::n]  # first chunk of each prompt
        else:
            want = kohya_join(outs[0].last_hidden_state.reshape(2, n * 77, -1), n)
        got = encode_prompts(model, prompts, max_token_length=length)
        again = encode_prompts(model, None, input_ids=ids if kind == "sdxl" else ids[0])
    assert got.hidden.shape[:2] == (2, 75 * n + 2)
    torch.testing.assert_close(got.hidden, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(again.hidden, got.hidden, rtol=0, atol=0)
    if kind == "sdxl":
        torch.testing.assert_close(got.pooled, want_pooled, rtol=1e-12, atol=1e-12)


def test_75_is_one_chunk(models):
    with torch.no_grad():
        for model in models.values():
            a, b = encode_prompts(model, PROMPTS), encode_prompts(model, PROMPTS, max_token_length=75)
            assert torch.equal(a.hidden, b.hidden)


def test_gradients_reach_the_encoders():
    te1, te2 = clip(2, 32, False, 3), clip(2, 24, True, 4)
    model = StableDiffusionModel("sdxl", False, None, None, [te1, te2], tokenizers_for("sdxl"), {})
    out = encode_prompts(model, PROMPTS, max_token_length=150)
    (out.hidden.square().mean() + out.pooled.square().mean()).backward()
    for te in (te1, te2):
        grad = te.get_input_embeddings().weight.grad
        assert grad is not None and grad[320].abs().sum() > 0
    assert te2.text_projection.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert not encode_prompts(model, PROMPTS).hidden.requires_grad


def test_pooled_at_eos_not_at_the_largest_id():
    # kohya's pool_workaround: with a textual-inversion token (id > EOS) CLIP's argmax would pick that token
    te1, te2 = clip(2, 32, False, 5, vocab=49410), clip(2, 24, True, 6, vocab=49410)
    model = StableDiffusionModel("sdxl", False, None, None, [te1, te2], tokenizers_for("sdxl"), {})
    row = [BOS, A, 49409, A, EOS] + [0] * 72
    ids2 = torch.tensor([[row]])
    with torch.no_grad():
        got = encode_prompts(model, None, input_ids=[ids2.clone(), ids2])
        last = te2(ids2[0]).last_hidden_state
    proj = te2.text_projection.weight.T
    torch.testing.assert_close(got.pooled, last[:, 4] @ proj, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got.pooled, last[:, 2] @ proj)


def test_clip_skip_can_reach_the_first_layer_but_not_the_embeddings(models):
    # hidden_states holds the embeddings plus one state per layer: clip_skip = layers takes the first layer's
    # output; one more would be the bare token embeddings, no layer at all, and is refused
    model = models["sd1"]
    te, ids = model.text_encoders[0], plain_ids(model.tokenizers[0], PROMPTS)
    with torch.no_grad():
        states = te(ids, output_hidden_states=True).hidden_states
        layers = len(states) - 1
        got = encode_prompts(model, PROMPTS, clip_skip=layers).hidden
        torch.testing.assert_close(got, final_norm(te, states[1]), rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="clip_skip"):
            encode_prompts(model, PROMPTS, clip_skip=layers + 1)


def test_one_id_tensor_per_text_encoder(models):
    # a second id tensor for SD1's single encoder (e.g. SDXL ids fed to an SD1 model) is an error, not ignored
    ids = tokenize(models["sd1"].tokenizers[0], PROMPTS)
    with pytest.raises(ValueError, match="1 text encoder"):
        encode_prompts(models["sd1"], PROMPTS, input_ids=[ids, ids])
