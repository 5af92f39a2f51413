"""assemble.owned: a tensor to keep as a parameter owns exactly its own memory, so that no parameter keeps a
fused q/k/v tensor (OpenCLIP in_proj) or a memory-mapped file alive, or shares storage with another parameter."""

from __future__ import annotations

import torch

from lorakit.models.assemble import owned


def _owns_itself(t: torch.Tensor) -> bool:
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_chunks_of_a_fused_tensor_are_copied_out():
    fused = torch.arange(3 * 4 * 5, dtype=torch.float32).reshape(12, 5)  # q, k, v stacked along dim 0
    parts = [owned(c, None) for c in fused.chunk(3, dim=0)]
    for i, part in enumerate(parts):
        assert torch.equal(part, fused[4 * i:4 * (i + 1)])
        assert _owns_itself(part)
        assert part.untyped_storage().data_ptr() != fused.untyped_storage().data_ptr()
    fused.zero_()  # the parameters do not change with the tensor they came from
    assert torch.equal(parts[2], torch.arange(40, 60, dtype=torch.float32).reshape(4, 5))


def test_first_chunk_and_slice_of_a_larger_storage_are_copied_out():
    big = torch.randn(10)
    head = owned(big[:4], None)  # offset 0 but a storage 2.5 times its size
    assert _owns_itself(head) and torch.equal(head, big[:4])
    head.add_(1)
    assert not torch.equal(head, big[:4])


def test_a_tensor_that_owns_its_memory_is_kept_and_dtype_applies_to_floats_only():
    t = torch.randn(3, 3)
    assert owned(t, None) is t
    assert owned(t, torch.float16).dtype == torch.float16
    ints = torch.arange(6)
    assert owned(ints, torch.float16).dtype == torch.int64
    transposed = owned(torch.randn(3, 4).T, None)
    assert transposed.is_contiguous() and _owns_itself(transposed)
