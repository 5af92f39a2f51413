"""Weighted captions: A1111's published parser examples, token/weight layouts against lorakit.models.text's own
(independently tested) layout, and the weighting of hidden states against kohya's per-chunk loop."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from lorakit.data.weighted import apply_token_weights, parse_prompt_attention, strip_weights, tokenize_weighted  # noqa: E402
from lorakit.models.text import tokenize  # noqa: E402
from lorakit.models.tokenizer import tokenizers_for  # noqa: E402


def approx(pairs):
    return [(t, pytest.approx(w)) for t, w in pairs]


@pytest.mark.parametrize("text, expected", [
    # The docstring examples of A1111's parse_prompt_attention (copied by kohya).
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    # The brief's cases.
    ("(black:1.2) cat", [("black", 1.2), (" cat", 1.0)]),
    ("[b]", [("b", 1 / 1.1)]),
    ("((c))", [("c", 1.1 * 1.1)]),
    ("[[d]] e", [("d", 1 / 1.21), (" e", 1.0)]),
    ("a \\(b\\) c", [("a (b) c", 1.0)]),
    ("stray ) and ] stay", [("stray ) and ] stay", 1.0)]),
    ("time 10:30", [("time 10:30", 1.0)]),
    ("(x: 0.5 )", [("x", 0.5)]),  # A1111 allows spaces around the number
    ("", [("", 1.0)]),
])
def test_parse(text, expected):
    assert parse_prompt_attention(text) == approx(expected)


def test_strip_weights():
    assert strip_weights("(black:1.2) cat, [small] ((dog))") == "black cat, small dog"


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
@pytest.mark.parametrize("length", [None, 150, 225])
def test_plain_prompt_matches_tokenize(kind, length):
    tok = tokenizers_for(kind)[0]
    prompts = ["a photo of a cat", " ".join(["a"] * 80), " ".join(["a"] * 160), "", "one two"]
    ids, weights = tokenize_weighted(tok, prompts, length)
    assert torch.equal(ids, tokenize(tok, prompts, length))
    assert torch.equal(weights, torch.ones_like(weights))


def test_weights_follow_their_tokens():
    tok = tokenizers_for("sd1")[0]
    ids, weights = tokenize_weighted(tok, ["a (red:1.5) [cat] dog"], None)
    expected_ids = tokenize(tok, ["a red cat dog"], None)  # every word is one token
    assert torch.equal(ids, expected_ids)
    assert weights[0, 0, :6].tolist() == pytest.approx([1.0, 1.0, 1.5, 1 / 1.1, 1.0, 1.0])
    assert weights[0, 0, 6:].eq(1).all()


def test_weights_across_chunks():
    tok = tokenizers_for("sd2")[0]
    prompt = " ".join(["a"] * 74) + " (b c:2)"  # b is the 75th token (end of chunk 0), c the 76th (chunk 1)
    ids, weights = tokenize_weighted(tok, [prompt], 150)
    assert weights[0, 0, 75].item() == 2.0 and weights[0, 0, 74].item() == 1.0 and weights[0, 0, 76].item() == 1.0
    assert weights[0, 1, 1].item() == 2.0 and weights[0, 1, 2:].eq(1).all()
    assert ids[0, 0, 76].item() == tok.eos_token_id  # a full chunk of text ends in <EOS>


def test_a_long_weighted_prompt_is_cut_at_its_end():
    # 81 tokens into one chunk of 75: the last 6 go, with their weights; the heavy first token keeps its 2.0
    tok = tokenizers_for("sd1")[0]
    prompt = "(a:2) " + " ".join(["b"] * 79) + " [c]"
    ids, weights = tokenize_weighted(tok, [prompt], None)
    assert torch.equal(ids, tokenize(tok, [strip_weights(prompt)], None))
    assert weights[0, 0, 1].item() == 2.0 and weights[0, 0, 2:].eq(1).all() and weights[0, 0, 0].item() == 1.0


def test_apply_token_weights_like_kohya():
    torch.manual_seed(0)
    for n in (1, 2, 3):
        hidden = torch.randn(2, 75 * n + 2, 8, dtype=torch.float64)
        weights = torch.rand(2, n, 77, dtype=torch.float64) + 0.5
        expected = hidden.clone()
        if n == 1:
            expected = expected * weights.squeeze(1).unsqueeze(2)
        else:  # kohya's SdTextEncodingStrategy.encode_tokens_with_weights; <BOS>/<EOS> weights are 1 there
            weights[:, :, 0] = 1
            weights[:, :, -1] = 1
            for i in range(n):
                expected[:, i * 75 + 1: i * 75 + 76] *= weights[:, i, 1:-1].unsqueeze(-1)
        assert torch.equal(apply_token_weights(hidden, weights), expected)
