"""Binding of `decode_step.c`: a pure-decode step's whole decoder stack in one C call.

`FusedDecode.prepare(model)` (from `LlamaForCausalLM.finish_loading`) checks that the
model can take it — CPU, products on the gemv kernel (`cpu_blas` backend `auto`), float32
activations (float32 weights, or 16-bit weights computing in float32), no q/k norm — and
collects the pointers of every layer's packed weights and norms once. Calling it on a step
returns the final-norm hidden states, or None when the step is not one it takes (a prefill
in the batch, more rows than the products give the gemv kernel, a pool it cannot read, a
forward hook on one of the modules it would skip):
the model then runs its PyTorch path, which calls the same kernels one by one. Both paths
give the same bits (see decode_step.c), so which one ran never shows in a token.

`PDSERVE_FUSED_DECODE=0` turns it off (read at load time; benchmarks compare the two).
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch.nn.modules import module as nn_module

from pdserve.model import kernels

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
LAYER_FIELDS = ("qkv", "o", "gate_up", "down", "qkv_bias", "o_bias", "gate_up_bias")
LAYER_FIELDS += ("down_bias", "input_norm", "post_norm", "k_cache", "v_cache")
ERRORS = {
    -1: (MemoryError, "the fused decode step could not allocate its scratch buffers"),
    -2: (IndexError, "KV slot out of range"),
    -3: (IndexError, "position outside the RoPE tables"),
    -4: (MemoryError, "paged attention kernel could not allocate its scratch buffer"),
    -5: (IndexError, "token id outside the embedding table"),
}


class Layer(ctypes.Structure):
    """decode_step.c's `Layer`."""

    _fields_ = [(name, _ptr) for name in LAYER_FIELDS]


class Model(ctypes.Structure):
    """decode_step.c's `Model`."""

    _fields_ = [
        (name, _i64)
        for name in (
            "num_layers",
            "hidden",
            "heads",
            "kv_heads",
            "head_dim",
            "inter",
            "block_size",
            "num_slots",
            "max_positions",
            "threads",
            "attn_min_tokens",
            "wtype",
            "kv_type",
            "vocab",
            "embed_type",
        )
    ]
    _fields_ += [("eps", ctypes.c_float), ("scale", ctypes.c_float)]
    _fields_ += [("cos", _ptr), ("sin", _ptr), ("final_norm", _ptr), ("embed", _ptr)]
    _fields_ += [("lm_head", _ptr), ("vocab_out", _i64)]


def is_enabled() -> bool:
    return os.environ.get("PDSERVE_FUSED_DECODE", "1") != "0"


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    fn = lib.decode_step_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(Model), ctypes.POINTER(Layer), _ptr, _ptr, _ptr, _i64]
    fn.argtypes += [_ptr] * 3 + [_i64, _ptr]
    return lib


def _packed(linear):
    """The gemv panels of a `llama.Linear`, or None when its products do not go there."""
    mm = getattr(linear, "cpu_mm", None)
    small = getattr(mm, "small", None)
    if small is None or getattr(mm, "invariant", None) is not None:
        return None
    return small


def _bias(linear) -> int | None:
    bias = linear.bias
    if bias is None:
        return None
    if bias.dtype != torch.float32 or not bias.is_contiguous():
        raise _NotFusable
    return bias.data_ptr()


class _NotFusable(Exception):
    pass


class FusedDecode:
    """The decoder stack of one model as one C call per pure-decode step."""

    def __init__(self, model, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.fn = lib.decode_step_f32
        self.model = model  # keeps every pointer below alive
        layer0 = model.layers[0]
        attn, mlp = layer0.self_attn, layer0.mlp
        # rows up to which every product of the PyTorch path runs on the gemv kernel too
        self.max_rows = min(mm.max_gemv_rows for mm in [*_mms(model), model.lm_head_mm])
        self.wtype = _packed(attn.qkv_proj).wtype
        cfg = model.config
        self.shape = Model(
            num_layers=len(model.layers),
            hidden=cfg.hidden_size,
            heads=attn.num_heads,
            kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim,
            inter=mlp.down_proj.cpu_mm.small.in_features,
            max_positions=model.rotary.cos.shape[0],
            wtype=self.wtype,
            eps=layer0.input_layernorm.eps,
            scale=attn.head_dim**-0.5,
            cos=model.rotary.cos.data_ptr(),
            sin=model.rotary.sin.data_ptr(),
            final_norm=model.norm.weight.data_ptr(),
            vocab=model.embed_tokens.shape[0],
            embed_type=kernels.KV_DTYPE_CODES[model.embed_tokens.dtype],
            embed=model.embed_tokens.data_ptr(),
            lm_head=model.lm_head_mm.small.packed.data_ptr(),
            vocab_out=model.lm_head_mm.small.out_features,
        )
        self.weights = [_layer_weights(layer) for layer in model.layers]
        # the hook tables of the modules it bypasses (registering a hook fills one in place)
        modules = [*model.layers.modules(), model.norm]
        self.hooks = [h for m in modules for h in (m._forward_hooks, m._forward_pre_hooks)]
        self._layers_for: tuple[int, ...] = ()
        self._layers: ctypes.Array | None = None
        self._logits: tuple[torch.Tensor, torch.Tensor] | None = None  # (hidden, logits)

    @classmethod
    def prepare(cls, model, lib: ctypes.CDLL | None = None) -> FusedDecode | None:
        """The fused step for `model`, or None when it cannot take one (see the module)."""
        if not is_enabled() or not _fusable(model):
            return None
        lib = lib or _packed(model.layers[0].self_attn.qkv_proj).lib
        if not hasattr(lib, "decode_step_f32"):
            return None
        try:
            return cls(model, _bind(lib))
        except _NotFusable:
            return None

    def __call__(self, input_ids, positions, kv_caches, meta) -> torch.Tensor | None:
        """Final-norm hidden states `[T, hidden]` float32 of a pure-decode step, or None."""
        rows = input_ids.shape[0]
        if not (0 < rows <= self.max_rows and meta.num_decode_tokens == rows):
            return None
        if meta.prefills or meta.output_rows is not None or self._hooked():
            return None
        # int64 on CPU, contiguous; held in locals until the call returns
        ints = [input_ids, positions, meta.slot_mapping]
        ints += [meta.decode_block_tables, meta.decode_context_lens]
        if any(t.dtype != torch.int64 or t.device.type != "cpu" for t in ints):
            return None
        ids, positions, slots, tables, lens = (t.contiguous() for t in ints)
        layers = self._layer_array(kv_caches)
        if layers is None:
            return None
        out = torch.empty(rows, self.shape.hidden)
        logits = torch.empty(rows, self.shape.vocab_out)
        self.shape.threads = kernels._num_threads or torch.get_num_threads()
        status = self.fn(
            ctypes.byref(self.shape),
            layers,
            ids.data_ptr(),
            out.data_ptr(),
            logits.data_ptr(),
            rows,
            positions.data_ptr(),
            slots.data_ptr(),
            tables.data_ptr(),
            tables.shape[1],
            lens.data_ptr(),
        )
        if status:
            error, message = ERRORS.get(status, (RuntimeError, f"fused decode failed ({status})"))
            raise error(message)
        self._logits = (out, logits)
        return out

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The logits the last call computed, when `hidden` is what it returned (once)."""
        last, self._logits = self._logits, None
        return last[1] if last is not None and last[0] is hidden else None

    def _hooked(self) -> bool:
        """True when a forward hook would see the modules run (the fused call skips them)."""
        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return True
        return any(self.hooks)

    def _layer_array(self, kv_caches) -> ctypes.Array | None:
        """The `Layer` array for this KV pool (rebuilt only when the pool changes)."""
        key = tuple(t.data_ptr() for kv in kv_caches for t in kv)
        if key == self._layers_for:
            return self._layers
        k0 = kv_caches[0][0]
        if k0.dtype not in kernels.KV_DTYPE_CODES or k0.device.type != "cpu":
            return None
        if not all(t.is_contiguous() and t.dtype == k0.dtype for kv in kv_caches for t in kv):
            return None
        self.shape.block_size, self.shape.kv_type = k0.shape[1], kernels.KV_DTYPE_CODES[k0.dtype]
        self.shape.num_slots = k0.shape[0] * k0.shape[1]
        bytes_per_token = 2 * self.shape.head_dim * k0.element_size()
        self.shape.attn_min_tokens = kernels.MIN_BYTES_PER_THREAD // bytes_per_token
        self._layers = (Layer * len(self.weights))(
            *(
                Layer(*w, k.data_ptr(), v.data_ptr())
                for w, (k, v) in zip(self.weights, kv_caches, strict=True)
            )
        )
        self._layers_for = key
        return self._layers


def _linears(layer) -> tuple:
    """A layer's products in `Layer`'s order."""
    attn, mlp = layer.self_attn, layer.mlp
    return (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)


def _mms(model):
    return [linear.cpu_mm for layer in model.layers for linear in _linears(layer)]


def _fusable(model) -> bool:
    """CPU, every product on the gemv kernel (one build), float32 activations and tables."""
    if model.compute_dtype != torch.float32 or model.rotary.cos.dtype != torch.float32:
        return False
    if model.rotary.cos.device.type != "cpu" or not kernels.is_available():
        return False
    layers = list(model.layers)
    if not layers or any(layer.self_attn.q_norm is not None for layer in layers):
        return False
    products = [_packed(m) for layer in layers for m in _linears(layer)]
    products.append(getattr(model.lm_head_mm, "small", None))
    if any(p is None for p in products) or len({id(p.lib) for p in products}) != 1:
        return False
    if len({p.wtype for p in products}) != 1:
        return False
    table = model.embed_tokens
    if table.dtype not in kernels.KV_DTYPE_CODES or not table.is_contiguous():
        return False
    norms = [model.norm] + [n for layer in layers for n in _norms(layer)]
    return all(n.weight.dtype == torch.float32 and n.weight.is_contiguous() for n in norms)


def _norms(layer):
    return (layer.input_layernorm, layer.post_attention_layernorm)


def _layer_weights(layer) -> tuple:
    """A layer's `Layer` fields but the pool: packed products, biases, norm weights."""
    linears = _linears(layer)
    packed = [_packed(m).packed.data_ptr() for m in linears]
    biases = [_bias(m) for m in linears]
    norms = [n.weight.data_ptr() for n in _norms(layer)]
    return (*packed, *biases, *norms)
