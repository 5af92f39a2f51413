"""sd-scripts' ``debug_dataset``: show what training would be fed, then stop. sd-scripts opens a cv2 window per
image; here each batch of the first epoch is printed (image files, captions as trained on, bucket, SDXL size and
crop conditioning, flips, loss weights), through the same loader as training, so augmentation and the caption
processing (shuffling, dropout, token warmup) show as they would be trained."""

from __future__ import annotations

from typing import Callable

__all__ = ["print_batches"]


def print_batches(dataset, order, loader, *, epoch: int = 1, write: Callable[[str], None] = print) -> int:
    """Print the batches of ``epoch`` of ``dataset`` (a TrainDataset, or the CustomBatches of a dataset_class);
    returns how many were printed."""
    total = dataset.steps_per_epoch
    write(f"debug_dataset: {dataset.summary}, {total} batches per epoch")
    order.set_position(epoch, 0)
    count = 0
    for count, batch in enumerate(loader, start=1):
        h, w = (int(v) for v in batch.target_sizes_hw[0])
        step = dataset.optimizer_step(batch.keys[0]) if batch.keys else count - 1
        write(f"epoch {epoch}, batch {count}/{total} (optimizer step {step + 1}): bucket {w}x{h}, "
              f"{len(batch)} image(s)")
        for i in range(len(batch)):
            oh, ow = (int(v) for v in batch.original_sizes_hw[i])
            top, left = (int(v) for v in batch.crop_top_lefts[i])
            write(f"  {batch.paths[i]}: size {ow}x{oh}, crop top-left ({top}, {left}), "
                  f"{'flipped' if batch.flipped[i] else 'not flipped'}, loss weight "
                  f"{float(batch.loss_weights[i]):g}, caption: {batch.captions[i]!r}")
    return count
