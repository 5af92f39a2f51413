"""cache_info's file is reused only when it lists exactly the folder's images (info_cache doc): after an image is
removed it is rebuilt, so captions are read again and the removed image leaves the file."""

from __future__ import annotations

import json

from lorakit.data.folders import subset_images
from lorakit.data.spec import SubsetSpec


def test_removing_an_image_rebuilds_the_cache(tmp_path, image_factory):
    for name in ("a", "b"):
        image_factory(f"c/{name}.png", 8, 8, caption=f"caption {name}")
    subset = SubsetSpec(image_dir=str(tmp_path / "c"), caption_extension=".txt", cache_info=True)
    assert [im.caption for im in subset_images(subset)] == ["caption a", "caption b"]

    (tmp_path / "c" / "b.png").unlink()
    (tmp_path / "c" / "a.txt").write_text("edited a", encoding="utf-8")
    assert [im.caption for im in subset_images(subset)] == ["edited a"]
    cached = json.loads((tmp_path / "c" / "metadata_cache.json").read_text(encoding="utf-8"))
    assert {key: meta["caption"] for key, meta in cached.items()} == {str(tmp_path / "c" / "a.png"): "edited a"}
