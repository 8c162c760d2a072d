"""The rank-file write path's shortcuts write the same bytes as the plain ones.

- ``compact_views`` gives contiguous TP slices a storage of their own without a copy; the file
  ``torch.save`` writes must equal the one written from clones.
- ``HashingFile`` hashes large writes on a second thread; the digest must equal ``hashlib``'s.
- ``refuse_non_finite`` checks a sum first; NaN and inf anywhere must still be refused.
"""

import hashlib
import io

import pytest
import torch
import torch.utils.serialization

from megatron.sft.bridge.checkpoint_io import compact_views
from megatron.sft.bridge.convert import refuse_non_finite
from megatron.sft.bridge.integrity import HashingFile


def _saved(state) -> bytes:
    config = torch.utils.serialization.config.save
    previous, config.compute_crc32 = config.compute_crc32, False
    try:
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf.getvalue()
    finally:
        config.compute_crc32 = previous


def test_compact_views_writes_what_clones_write():
    full = torch.randn(8, 6).to(torch.bfloat16)
    wide = torch.randn(4, 8)
    model = {"rows": full[2:4], "chunk": full.chunk(2, 0)[1], "cols": wide[:, :4],
             "whole": torch.ones(3), "ints": torch.arange(10)[3:7], "empty": full[3:3]}
    clones = {k: v.clone() if v.untyped_storage().nbytes() != v.numel() * v.element_size() else v
              for k, v in model.items()}
    compact = compact_views({"model": model})
    assert _saved(compact) == _saved({"model": clones})
    back = torch.load(io.BytesIO(_saved(compact)), weights_only=True)
    assert all(torch.equal(back["model"][k], v) for k, v in model.items())


def test_hashing_file_digest_equals_hashlib():
    chunks = [b"header", bytes(range(256)) * 9000, b"", b"x" * (3 << 20), b"tail"]
    out = io.BytesIO()
    f = HashingFile(out)
    for c in chunks:
        f.write(memoryview(c))
    whole = b"".join(chunks)
    assert f.hexdigest() == hashlib.sha256(whole).hexdigest() and f.bytes == len(whole)
    assert out.getvalue() == whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_still_refused_and_huge_finite_values_pass(dtype, bad):
    t = torch.zeros(1000, dtype=dtype)
    t[517] = bad
    with pytest.raises(ValueError, match="non-finite"):
        refuse_non_finite("w", t, "fix it")
    big = torch.full((1000,), torch.finfo(dtype).max, dtype=dtype)  # the sum overflows
    refuse_non_finite("w", big, "fix it")
