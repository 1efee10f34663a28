"""Binding of the sampling kernels: top-p masking without a sort (`sampling.c`), and the
sampler's maths row by row in one fixed order (`categorical.c`, batch-invariant mode).

`top_p_mask_` takes CPU float32 `[rows, vocab]` logits with contiguous columns and masks
them in place; `can_mask(logits)` says whether it applies (and whether `sample_rows` and
`log_softmax_rows` do). Callers keep a PyTorch path of the same meaning for when it does
not: no compiler, `PDSERVE_DISABLE_KERNELS=1`, GPU tensors, other dtypes.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from pdserve.model.kernels import _by_rows, _library, is_available


def can_mask(logits: torch.Tensor) -> bool:
    """True when `top_p_mask_` applies to `logits`."""
    return (
        logits.device.type == "cpu"
        and logits.dtype == torch.float32
        and logits.dim() == 2
        and logits.stride(1) == 1
        and is_available()
    )


@functools.cache
def _top_p_kernel():
    fn = _library().top_p_mask_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 4
    return fn


def _top_p_rows(*args) -> None:
    if _top_p_kernel()(*args) != 0:
        raise MemoryError("top-p kernel could not allocate its scratch buffer")


def top_p_mask_(logits: torch.Tensor, top_p: torch.Tensor) -> None:
    """Set to -inf, in place, every logit of a row outside its nucleus: a token is kept iff
    the probability mass of the tokens with a strictly larger logit is < the row's top_p
    (so the most likely token always is, and all tokens tied with the last kept one).
    Rows with top_p >= 1 are untouched; -inf logits weigh 0.

    logits: [rows, vocab] float32 on CPU, columns contiguous (rows may be strided).
    top_p: [rows], any float dtype (used as float64).
    """
    if not can_mask(logits):
        raise ValueError("top_p_mask_ needs the kernels and CPU float32 [rows, vocab] logits")
    rows, vocab = logits.shape
    if top_p.shape != (rows,):
        raise ValueError(f"top_p has shape {tuple(top_p.shape)}, expected ({rows},)")
    top_p = top_p.to("cpu", torch.float64).contiguous()
    args = (logits.data_ptr(), top_p.data_ptr(), vocab, logits.stride(0))
    _by_rows(_top_p_rows, args, rows, rows * vocab)


@functools.cache
def _row_kernels():
    lib, i64, ptr = _library(), ctypes.c_int64, ctypes.c_void_p
    lib.sample_rows_f32.restype = ctypes.c_int
    lib.sample_rows_f32.argtypes = [ptr] * 4 + [i64] * 4
    lib.log_softmax_rows_f32.restype = None
    lib.log_softmax_rows_f32.argtypes = [ptr] * 2 + [i64] * 4
    return lib


def _sample_rows(*args) -> None:
    if _row_kernels().sample_rows_f32(*args) != 0:
        raise MemoryError("sampling kernel could not allocate its scratch buffer")


def sample_rows(logits: torch.Tensor, min_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A token id per row (int64 `[rows]`): the first token whose cumulative weight
    exp(x - max) — zeroed below the row's `min_p` — exceeds u times the row's total.
    logits: `[rows, vocab]` (see `can_mask`), after temperature and masks; min_p, u: `[rows]`.
    Each row's result depends on that row alone (see categorical.c)."""
    if not can_mask(logits):
        raise ValueError("sample_rows needs the kernels and CPU float32 [rows, vocab] logits")
    rows, vocab = logits.shape
    min_p = min_p.to("cpu", torch.float64).contiguous()
    u = u.to("cpu", torch.float64).contiguous()
    out = torch.empty(rows, dtype=torch.int64)
    args = (logits.data_ptr(), min_p.data_ptr(), u.data_ptr(), out.data_ptr(), vocab)
    _by_rows(_sample_rows, (*args, logits.stride(0)), rows, rows * vocab)
    return out


def log_softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """`log_softmax(logits, -1)` (float32), each row in one fixed order (see categorical.c)."""
    if not can_mask(logits):
        raise ValueError("log_softmax_rows needs the kernels and CPU float32 [rows, vocab]")
    rows, vocab = logits.shape
    out = torch.empty(rows, vocab)
    args = (logits.data_ptr(), out.data_ptr(), vocab, logits.stride(0))
    _by_rows(_row_kernels().log_softmax_rows_f32, args, rows, rows * vocab)
    return out
