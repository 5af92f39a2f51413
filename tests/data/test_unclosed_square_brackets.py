"""An unclosed ``[`` divides the weight of the rest of the prompt by 1.1, as an unclosed ``(`` multiplies it
(A1111's parse_prompt_attention, which kohya copies: the brackets still open at the end are applied)."""

from __future__ import annotations

import pytest

from lorakit.data.weighted import parse_prompt_attention


@pytest.mark.parametrize("prompt, expected", [
    ("a [b c", [("a ", 1.0), ("b c", 1 / 1.1)]),
    ("a [[b", [("a ", 1.0), ("b", 1 / 1.1 / 1.1)]),
    ("[a (b", [("a ", 1 / 1.1), ("b", 1.1 / 1.1)]),
])
def test_an_unclosed_square_bracket_weakens_the_rest(prompt, expected):
    got = parse_prompt_attention(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])
