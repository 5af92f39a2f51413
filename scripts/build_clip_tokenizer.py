"""Derive the CLIP tokenizer files that lorakit ships (``lorakit/models/clip_tokenizer/``) from the BPE merge
list that OpenAI's CLIP published and that the ``open-clip-torch`` wheel on PyPI carries as
``open_clip/bpe_simple_vocab_16e6.txt.gz``.

    pip download --no-deps open-clip-torch -d /tmp/oc
    python scripts/build_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl

The vocabulary is built the way CLIP's ``SimpleTokenizer`` builds it: the 256 byte symbols, the same with the
end-of-word mark ``</w>``, one token per merge (the first 48 894 merges), then ``<|startoftext|>`` and
``<|endoftext|>``: 49 408 tokens, the vocabulary of every Stable Diffusion text encoder (SD1, SD2, SDXL).
"""

from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "lorakit" / "models" / "clip_tokenizer"
GZ_IN_WHEEL = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of the 256 byte values to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_merges(source: Path) -> list[str]:
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            data = wheel.read(GZ_IN_WHEEL)
    else:
        data = source.read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = lines[1:NUM_MERGES + 1]  # line 0 is a version header
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise SystemExit(f"{source}: expected {NUM_MERGES} merges of two symbols each")
    return merges


def build_vocab(merges: list[str]) -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit(__doc__)
    merges = read_merges(Path(argv[0]))
    vocab = build_vocab(merges)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {OUT}")


if __name__ == "__main__":
    main(sys.argv[1:])
