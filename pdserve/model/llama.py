"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) in plain PyTorch over a paged
KV cache. One file to read in one sitting: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Differences from the Hugging Face modules, all for speed, none for maths:
- q/k/v and gate/up projections are fused into one matmul each (the loader concatenates the
  checkpoint's tensors);
- tokens of every sequence in a step are flattened into one `[T, hidden]` batch: no padding;
- logits are computed only for the rows the sampler needs.

Numerics follow transformers so that greedy outputs match token for token: norms run in
float32 and cast back, RoPE tables are computed in float32 and cast to the model dtype.
The device is whatever the weights live on; nothing here assumes CPU.

16-bit models on CPU (with the C kernels): the weights and the KV pool stay in bfloat16 or
float16 (half the bytes to read), everything else runs in float32 — activations, norms,
RoPE, attention, and every sum (the products widen the weights in the kernel). That is the
float32 model on 16-bit-rounded weights, with keys and values rounded to 16 bits as they
enter the pool; see `finish_loading` and README ("What `--dtype` means on CPU").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.config import ModelConfig, RopeConfig
from pdserve.errors import ModelLoadError
from pdserve.model import cpu_blas, kernels
from pdserve.model.attention import (
    AttentionMetadata,
    paged_attention,
    paged_attention_output_rows,
    write_kv,
)
from pdserve.model.kernels.decode_step import FusedDecode

KVCache = tuple[torch.Tensor, torch.Tensor]  # keys, values: [num_blocks, block_size, Hkv, D]
RopeTables = tuple[torch.Tensor, torch.Tensor]  # cos, sin: [T, 1, D/2]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), False)
        self.eps = eps
        # Batch-invariant mode: every input through the C kernel (one fixed order per row);
        # torch's reduction over the last dim of a 3-D input picks its order by shape.
        self.always_fused = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise x; with `residual`, first `x += residual` in place (the residual stream
        then continues in x), as one fused pass where the C kernels apply."""
        if kernels.fuses(x) and x.dim() == 2 and x.stride(1) == 1:
            return kernels.rms_norm(x, self.weight, self.eps, residual)
        if self.always_fused and residual is None:  # q/k norms: [T, heads, D]
            rows = x.reshape(-1, x.shape[-1]).contiguous()
            return kernels.rms_norm(rows, self.weight, self.eps).view(x.shape)
        if residual is not None:
            x.add_(residual)
        # Accumulate in float32: bf16 reductions are both inexact and slow on CPU.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Linear(nn.Module):
    """y = x W^T (+ b), weight stored `[out, in]` as in checkpoints."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool, dtype, device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim, dtype=dtype, device=device), False)
        self.bias = (
            nn.Parameter(torch.zeros(out_dim, dtype=dtype, device=device), False) if bias else None
        )
        self.cpu_mm: cpu_blas.CpuMatmul | None = None  # set by `finish_loading`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_blas.linear(x, self.weight, self.bias, self.cpu_mm)

    def finish_loading(self, backend: str) -> None:
        self.cpu_mm = cpu_blas.CpuMatmul.prepare(self.weight, backend, keep_dense=False)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies `[head_dim // 2]` in float32, with linear or llama3 scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (rotate halves), as Llama and Qwen checkpoints on the Hub use."""

    def __init__(self, config: ModelConfig, max_len: int, dtype, device) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(config.rope, config.head_dim).to(device)
        positions = torch.arange(max_len, dtype=torch.float32, device=device)
        angles = torch.outer(positions, inv_freq)  # [max_len, D/2], float32 like transformers
        self.register_buffer("cos", angles.cos().to(dtype), persistent=False)
        self.register_buffer("sin", angles.sin().to(dtype), persistent=False)

    def tables(self, positions: torch.Tensor) -> RopeTables:
        """cos and sin `[T, 1, D/2]` for this step's positions, shared by every layer."""
        return (
            self.cos.index_select(0, positions).unsqueeze(1),
            self.sin.index_select(0, positions).unsqueeze(1),
        )


def apply_rope(x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    cos, sin = tables  # [T, 1, D/2]
    if kernels.fuses(x) and x.stride(2) == 1 and x.stride(1) == x.shape[2]:
        return kernels.rope_neox_(x, cos, sin)  # in place: x is a fresh projection output
    x1, x2 = x.chunk(2, dim=-1)  # x: [T, heads, D]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, dtype, device) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        hidden = config.hidden_size
        self.qkv_proj = Linear(
            hidden, self.q_size + 2 * self.kv_size, config.qkv_bias, dtype, device
        )
        self.o_proj = Linear(self.q_size, hidden, config.o_bias, dtype, device)
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype, device)

    def forward(self, x, rope: RopeTables, kv_cache: KVCache, meta: AttentionMetadata, last: bool):
        """In the `last` layer, the output of `meta.output_rows` only (when set); every
        row's keys and values still go into the cache."""
        num_tokens = x.shape[0]
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [T, (H + 2 Hkv) D]
        qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, heads + kv_heads, head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, kv_heads, head_dim)
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :heads]), self.k_norm(qk[:, heads:])), dim=1)
        qk = apply_rope(qk, rope)  # q and k in one pass: half the element-wise ops
        q, k = qk.split([heads, kv_heads], dim=1)
        k_cache, v_cache = kv_cache
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if last and meta.output_rows is not None:
            out = paged_attention_output_rows(q, k_cache, v_cache, meta)  # [S, H, D]
        else:
            out = paged_attention(q, k, v, k_cache, v_cache, meta)  # [T, H, D]
        return self.o_proj(out.view(out.shape[0], self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype, device) -> None:
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_up_proj = Linear(hidden, 2 * inter, config.mlp_bias, dtype, device)
        self.down_proj = Linear(inter, hidden, config.mlp_bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if kernels.fuses(gate_up):
            return self.down_proj(kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype, device) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype, device)
        self.self_attn = Attention(config, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype, device)
        self.mlp = MLP(config, dtype, device)

    def forward(self, x, rope: RopeTables, kv_cache: KVCache, meta: AttentionMetadata, last: bool):
        """x: this layer's own copy of the residual stream (updated in place). In the `last`
        layer only `meta.output_rows` go on past attention (see `LlamaForCausalLM.forward`)."""
        attn_out = self.self_attn(self.input_layernorm(x), rope, kv_cache, meta, last)
        if last and meta.output_rows is not None:
            x = x.index_select(0, meta.output_rows)
        h = self.post_attention_layernorm(x, residual=attn_out)  # x += attn_out, then norm
        return x + self.mlp(h)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_len: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.embed_tokens = nn.Parameter(
            torch.empty(config.vocab_size, hidden, dtype=dtype, device=device), False
        )
        self.rotary = RotaryEmbedding(config, max_len, dtype, device)
        self.layers = nn.ModuleList(
            DecoderLayer(config, dtype, device) for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(hidden, config.rms_norm_eps, dtype, device)
        self.lm_head = (
            self.embed_tokens
            if config.tie_word_embeddings
            else nn.Parameter(
                torch.empty(config.vocab_size, hidden, dtype=dtype, device=device), False
            )
        )
        self.lm_head_mm: cpu_blas.CpuMatmul | None = None  # set by `finish_loading`
        # dtype of activations: the weights' own, or float32 for 16-bit weights on CPU
        self.compute_dtype = dtype
        # pure-decode steps as one C call (`kernels/decode_step.py`), set by `finish_loading`
        self.fused_decode: FusedDecode | None = None

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[KVCache],  # one per layer
        meta: AttentionMetadata,
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:  # [T, hidden], or [len(meta.output_rows), hidden]
        """Final hidden states of every token, or only of `meta.output_rows` when set (the
        rows whose next token is sampled): nothing reads the others' last-layer outputs, so
        the last layer computes their keys and values for the cache and stops there,
        skipping its attention, output projection and MLP on every prompt token but a
        prompt's last (about a tenth of a prefill's products with 8 layers). The kept rows
        attend over their whole context in the cache, each like a decode.

        `after_layer(i)` runs once layer i has written this step's keys and values
        into the cache: a prefill worker streams them to a decode worker from there."""
        if self.fused_decode is not None and after_layer is None:
            hidden = self.fused_decode(input_ids, positions, kv_caches, meta)  # None: not its step
            if hidden is not None:
                return hidden
        x = F.embedding(input_ids, self.embed_tokens).to(self.compute_dtype)
        rope = self.rotary.tables(positions)
        last = len(self.layers) - 1
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            x = layer(x, rope, kv_cache, meta, i == last)
            if after_layer is not None:
                after_layer(i)
        return self.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, hidden] -> [S, vocab] float32 (sampling maths always runs in float32)."""
        logits = self.fused_decode and self.fused_decode.logits_of(hidden)  # the fused step's
        if logits is not None:
            return logits
        return cpu_blas.linear(hidden, self.lm_head, None, self.lm_head_mm).float()

    @property
    def max_blas_rows(self) -> int:
        """Products of at most this many rows run on OpenBLAS's threads, not torch's."""
        return self.lm_head_mm.max_blas_rows if self.lm_head_mm is not None else 0

    def finish_loading(self, batch_invariant: bool = False) -> None:
        """Hand products on CPU to the gemv kernel / oneDNN once the weights are in place
        (see `cpu_blas`: 1.5-2x faster than torch's MKL path on AMD CPUs), or with
        `batch_invariant` to the batch-invariant kernels (the caller checked they exist).
        8-bit weights replace this step (`quant.quantize_model`, called by the loader)."""
        if batch_invariant:
            for norm in self.modules():
                if isinstance(norm, RMSNorm):
                    norm.always_fused = True
        elif not cpu_blas.is_enabled_for(self.lm_head):
            return
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        weight_bytes = sum(m.weight.nbytes for m in linears) + self.lm_head.nbytes
        dtype = self.lm_head.dtype
        backend = "invariant" if batch_invariant else cpu_blas.resolve_backend(weight_bytes, dtype)
        for module in linears:
            module.finish_loading(backend)
        tied = self.lm_head is self.embed_tokens  # embedding lookups still need the rows
        self.lm_head_mm = cpu_blas.CpuMatmul.prepare(self.lm_head, backend, keep_dense=tied)
        if dtype in cpu_blas.HALF_DTYPES and kernels.is_available():
            self._compute_in_float32()
        self.fused_decode = None if batch_invariant else FusedDecode.prepare(self)

    def _compute_in_float32(self) -> None:
        """16-bit weights on CPU: activations in float32 from here on. Every product already
        takes float32 input (the kernel widens the 16-bit weights), so only what multiplies
        activations directly is widened: norm weights and biases (exactly: the 16-bit values
        themselves) and the RoPE tables (recomputed in float32, as a float32 model has them).
        The embedding table and the KV pool stay 16-bit."""
        self.compute_dtype = torch.float32
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.data = module.weight.data.float()
            elif isinstance(module, Linear) and module.bias is not None:
                module.bias.data = module.bias.data.float()
        max_len, device = self.rotary.cos.shape[0], self.rotary.cos.device
        self.rotary = RotaryEmbedding(self.config, max_len, torch.float32, device)

    # ---- weights ---------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (Hugging Face names) into the fused parameters.

        Raises `ModelLoadError` naming the tensor when one is missing, unexpected in shape,
        or absent from the checkpoint altogether.
        """
        loaded: set[str] = set()
        for name, tensor in weights:
            target = self._locate(name)
            if target is None:
                continue  # e.g. rotary inv_freq buffers some checkpoints carry
            param, rows = target
            dest = param.data if rows is None else param.data[rows]
            if dest.shape != tensor.shape:
                raise ModelLoadError(
                    name, f"shape {tuple(tensor.shape)} does not match {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            loaded.add(name)
        missing = sorted(set(self.expected_weight_names()) - loaded)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ModelLoadError("checkpoint", f"{len(missing)} tensors missing: {shown}")

    def expected_weight_names(self) -> list[str]:
        c = self.config
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not c.tie_word_embeddings:
            names.append("lm_head.weight")
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
            names += [p + f"self_attn.{n}_proj.weight" for n in ("q", "k", "v", "o")]
            names += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
            if c.qkv_bias:
                names += [p + f"self_attn.{n}_proj.bias" for n in ("q", "k", "v")]
            if c.o_bias:
                names.append(p + "self_attn.o_proj.bias")
            if c.mlp_bias:
                names += [p + f"mlp.{n}_proj.bias" for n in ("gate", "up", "down")]
            if c.qk_norm:
                names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        return names

    def _locate(self, name: str) -> tuple[nn.Parameter, slice | None] | None:
        """Map a checkpoint tensor name to (parameter, rows of it) in this module."""
        if name == "model.embed_tokens.weight":
            return self.embed_tokens, None
        if name == "lm_head.weight":
            # Tied checkpoints sometimes carry a copy of the embedding here; it is the same.
            return None if self.config.tie_word_embeddings else (self.lm_head, None)
        if name == "model.norm.weight":
            return self.norm.weight, None
        if not name.startswith("model.layers."):
            return None
        index, _, rest = name[len("model.layers.") :].partition(".")
        if not index.isdigit() or int(index) >= len(self.layers):
            return None
        return _locate_in_layer(self.layers[int(index)], rest)


def _locate_in_layer(layer: DecoderLayer, rest: str) -> tuple[nn.Parameter, slice | None] | None:
    module_name, _, kind = rest.rpartition(".")  # kind: "weight" or "bias"
    attn, mlp = layer.self_attn, layer.mlp
    q, kv = attn.q_size, attn.kv_size
    inter = mlp.down_proj.weight.shape[1]
    fused = {
        "self_attn.q_proj": (attn.qkv_proj, slice(0, q)),
        "self_attn.k_proj": (attn.qkv_proj, slice(q, q + kv)),
        "self_attn.v_proj": (attn.qkv_proj, slice(q + kv, q + 2 * kv)),
        "mlp.gate_proj": (mlp.gate_up_proj, slice(0, inter)),
        "mlp.up_proj": (mlp.gate_up_proj, slice(inter, 2 * inter)),
    }
    whole = {
        "self_attn.o_proj": attn.o_proj,
        "mlp.down_proj": mlp.down_proj,
        "input_layernorm": layer.input_layernorm,
        "post_attention_layernorm": layer.post_attention_layernorm,
        "self_attn.q_norm": attn.q_norm,
        "self_attn.k_norm": attn.k_norm,
    }
    if module_name in fused:
        module, rows = fused[module_name]
    elif whole.get(module_name) is not None:
        module, rows = whole[module_name], None
    else:
        return None
    param = getattr(module, kind, None)
    return (param, rows) if param is not None else None
