"""The small-batch decode product (`kernels/gemv.c`): within rounding of a float64 reference
for every row count, odd shapes, each weight and activation dtype, and both instruction sets
this host can run (the AVX2 build is tested on AVX-512 hosts too)."""

from __future__ import annotations

import pytest
import torch

from pdserve.model import kernels
from pdserve.model.kernels import gemv

pytestmark = pytest.mark.skipif(not gemv.is_available(), reason="C kernels unavailable")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Relative error of rounding a float32 result once to the output dtype (half an ulp), with margin.
OUTPUT_EPS = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}
# Shapes (out, in): below one panel, odd in both, many panels with a ragged last one.
SHAPES = ((5, 3), (37, 19), (100, 64), (130, 257))
MAX_ROWS = 19  # past two row groups of the widest tile (8 rows on AVX-512, 4 on AVX2)


def _libraries() -> list[tuple[str, object]]:
    libs = [("native", gemv.library())]
    if "avx512f" in kernels.cpu_flags():
        libs.append(("avx2", gemv.build(("-mno-avx512f",))))
    return libs


LIBRARIES = _libraries()


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """|y - exact| within the output rounding plus float32 summation error."""
    exact = x.double() @ w.double().T
    magnitude = x.double().abs() @ w.double().abs().T  # bounds any summation order's error
    if bias is not None:
        exact += bias.double()
        magnitude += bias.double().abs()
    bound = OUTPUT_EPS[y.dtype] * exact.abs() + 1e-5 * magnitude + 1e-30
    error = (y.double() - exact).abs()
    assert y.dtype == x.dtype and y.shape == exact.shape
    assert bool((error <= bound).all()), f"max error / bound {(error / bound).max():.2f}"


@pytest.mark.parametrize("isa,lib", LIBRARIES, ids=[name for name, _ in LIBRARIES])
@pytest.mark.parametrize("wdtype", DTYPES, ids=str)
def test_every_row_count_and_shape_within_rounding(isa, lib, wdtype):
    gen = torch.Generator().manual_seed(1)
    for out_features, in_features in SHAPES:
        w = torch.randn(out_features, in_features, generator=gen).to(wdtype)
        bias = torch.randn(out_features, generator=gen)
        packed = gemv.PackedGemv.prepare(w, lib)
        for xdtype in {torch.float32, wdtype}:  # float32 activations, and the weights' own
            for rows in range(1, MAX_ROWS + 1):
                x = torch.randn(rows, in_features, generator=gen).to(xdtype)
                _check(packed(x), x, w, None)
                _check(packed(x, bias), x, w, bias)


@pytest.mark.parametrize("isa,lib", LIBRARIES, ids=[name for name, _ in LIBRARIES])
def test_strided_rows_and_bf16_bias(isa, lib):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(48, 40, generator=gen).bfloat16()
    wide = torch.randn(3, 64, generator=gen).bfloat16()
    x = wide[:, 10:50]  # rows 64 apart: a view into a wider buffer
    bias = torch.randn(48, generator=gen).bfloat16()
    y = gemv.PackedGemv.prepare(w, lib)(x, bias)
    _check(y, x, w, bias.float())


def test_thread_count_does_not_change_a_bit(monkeypatch):
    """Each output element is computed whole in one chunk: threads change who, not how."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(300, 96, generator=gen)
    x = torch.randn(5, 96, generator=gen)
    packed = gemv.PackedGemv.prepare(w)
    results = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(kernels, "_num_threads", threads)
        results.append(packed(x))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.parametrize("wdtype", DTYPES, ids=str)
def test_the_work_split_does_not_change_a_bit(monkeypatch, wdtype):
    """However a product is cut into chunks (one panel each, 64 or 256 KiB, four per thread:
    the default) and whichever thread claims which, every output has the same bits."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(1000, 300, generator=gen).to(wdtype)  # 63 panels, 0.3-1.2 MB
    x = torch.randn(3, 300, generator=gen).to(wdtype)
    packed = gemv.PackedGemv.prepare(w)
    monkeypatch.setattr(kernels, "_num_threads", 2)
    default = gemv.set_chunk_bytes(1)
    try:
        results = [packed(x)]
        for num_bytes in (64 * 1024, 256 * 1024, default):
            gemv.set_chunk_bytes(num_bytes)
            results.append(packed(x))
    finally:
        gemv.set_chunk_bytes(default)
    assert default == 0
    assert all(torch.equal(results[0], r) for r in results[1:])
    monkeypatch.setattr(kernels, "_num_threads", 1)
    assert torch.equal(results[0], packed(x))


def test_packed_sizes_halve_with_16_bit_weights():
    w = torch.randn(33, 17)
    sizes = {d: gemv.PackedGemv.prepare(w.to(d)).packed.nbytes for d in DTYPES}
    assert sizes[torch.float32] == 3 * 18 * 16 * 4  # 3 panels of 16, in 17 padded to 18
    assert sizes[torch.bfloat16] == sizes[torch.float16] == sizes[torch.float32] // 2


def test_isa_setting_is_checked(monkeypatch):
    monkeypatch.setenv("PDSERVE_PREFETCH_BYTES", "1024")
    monkeypatch.setenv("PDSERVE_KERNELS_ISA", "avx2")
    monkeypatch.setenv("PDSERVE_PREFETCH_LOCALITY", "0")
    assert kernels.isa_flags() == ["-mno-avx512f", "-DPREFETCH_LOCALITY=0", "-DPREFETCH_BYTES=1024"]
    monkeypatch.setenv("PDSERVE_KERNELS_ISA", "sse9")
    with pytest.raises(ValueError, match="PDSERVE_KERNELS_ISA"):
        kernels.isa_flags()


def test_prefetch_hint_follows_the_vendor_and_the_override(monkeypatch):
    """prefetcht0 on Intel (prefetchnta halved the weight stream there), prefetchnta
    elsewhere as measured on AMD; the environment overrides both, and is checked."""
    monkeypatch.delenv("PDSERVE_PREFETCH_LOCALITY", raising=False)
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: "GenuineIntel")
    assert kernels.prefetch_locality() == 3
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: "AuthenticAMD")
    assert kernels.prefetch_locality() == 0
    monkeypatch.setenv("PDSERVE_PREFETCH_LOCALITY", "2")
    assert kernels.prefetch_locality() == 2
    monkeypatch.setenv("PDSERVE_PREFETCH_LOCALITY", "nta")
    with pytest.raises(ValueError, match="PDSERVE_PREFETCH_LOCALITY"):
        kernels.prefetch_locality()


def test_prefetch_distance_follows_the_vendor_and_the_override(monkeypatch):
    """4096 bytes ahead on Intel (batch-1 decode 1.06-1.19x faster there), gemv.c's own
    1024 elsewhere (no flag); the environment overrides both, and is checked."""
    monkeypatch.setenv("PDSERVE_KERNELS_ISA", "native")
    monkeypatch.setenv("PDSERVE_PREFETCH_LOCALITY", "3")
    monkeypatch.delenv("PDSERVE_PREFETCH_BYTES", raising=False)
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: "AuthenticAMD")
    assert kernels.isa_flags() == ["-DPREFETCH_LOCALITY=3"]  # gemv.c's own default
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: "GenuineIntel")
    assert kernels.isa_flags() == ["-DPREFETCH_LOCALITY=3", "-DPREFETCH_BYTES=4096"]
    monkeypatch.setenv("PDSERVE_PREFETCH_BYTES", "2048")
    assert kernels.isa_flags() == ["-DPREFETCH_LOCALITY=3", "-DPREFETCH_BYTES=2048"]
    for bad in ("2k", "-64", "32", "1048576"):
        monkeypatch.setenv("PDSERVE_PREFETCH_BYTES", bad)
        with pytest.raises(ValueError, match="PDSERVE_PREFETCH_BYTES"):
            kernels.isa_flags()


@pytest.mark.skipif(not gemv.is_available(), reason="needs the C kernels")
@pytest.mark.parametrize(
    "flags", [("-DPREFETCH_LOCALITY=0",), ("-DPREFETCH_LOCALITY=3", "-DPREFETCH_BYTES=4096")]
)
def test_the_prefetch_hint_changes_no_bit(monkeypatch, flags):
    """A prefetch moves no data the kernel computes with: any hint or distance gives the
    same bits."""
    torch.manual_seed(0)
    w, x = torch.randn(100, 70), torch.randn(3, 70)
    reference = gemv.PackedGemv.prepare(w, lib=gemv.build(("-DPREFETCH_LOCALITY=3",)))(x)
    lib = gemv.build(flags)
    assert torch.equal(gemv.PackedGemv.prepare(w, lib=lib)(x), reference)
