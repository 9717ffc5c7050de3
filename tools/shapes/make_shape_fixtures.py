#!/usr/bin/python3
"""Random-weight models in Hugging Face layout, with reference outputs from an independent float64 numpy
implementation of LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM.

They cover the shapes the trained fixtures do not: odd head counts, GQA 3:1, MQA, untied embeddings, Llama 3.1
rope scaling, the newer config.json form (rope_parameters / dtype), head_dim != hidden / heads, MLX affine
8-bit group 32 and 4-bit group 128 (tied and untied), Qwen2 q/k/v biases, and a sharded checkpoint.

usage:
    tools/shapes/make_shape_fixtures.py                     # writes tests/fixtures/shapes.tar.xz
    tools/shapes/make_shape_fixtures.py --dir /tmp/shapes   # also writes the unpacked tree there
    tools/shapes/make_shape_fixtures.py --check             # regenerates and compares with the tarball, byte for byte
    tools/shapes/make_shape_fixtures.py --fuzz-corpus tests/fuzz/corpus/safetensors   # tiny valid safetensors seeds
    tools/shapes/make_shape_fixtures.py --validate build/fixtures/models/stories260K build/fixtures/goldens/stories260K.goldens.json
        # checks this reference against goldens made by transformers itself (trained fixtures; KEY picks
        # cases.KEY, e.g. --validate build/fixtures/models/kjv-qwen3-21m build/fixtures/goldens/kjv-qwen3.goldens.json bf16)

Everything is deterministic (fixed numpy seeds, a tar with fixed metadata, xz at a fixed preset), so a re-run
gives identical bytes.

Each model folder holds config.json, model.safetensors (or an index + 2 shards) and goldens.json in the format of
the kjv-qwen3 goldens: cases[] of {prompt_ids, top20_ids, top20_logits, logsumexp, greedy_ids, greedy_margins}
(case 0 also has all_logits), plus meta.rope_inv_freq (the reference's inverse frequencies, float64),
meta.expect (what the loader must find) and meta.sensitivity (how far the top-20 logprobs move when one feature
of the forward pass is dropped: proof that the goldens can catch that feature being wrong).

The reference (forward() below) is written from the math of the Hugging Face modeling code, in float64:
  x = embed[ids]
  per layer: h = rmsnorm(x) * w_in;  q, k, v = h Wq^T (+bq), h Wk^T (+bk), h Wv^T (+bv)
             Qwen3: q, k = rmsnorm per head * q_norm / k_norm;  RoPE rotate_half with cos/sin of
             pos * cat(inv_freq, inv_freq);  kv head of query head h: h // (n_heads / n_kv_heads)
             attn = softmax(q k^T / sqrt(head_dim) + causal mask) v;  x += attn Wo^T
             h = rmsnorm(x) * w_post;  x += (silu(h Wg^T) * (h Wu^T)) Wd^T
  logits = (rmsnorm(x) * w_norm) lm_head^T      (lm_head = embed when tied)
Weights enter exactly as stored: bf16 values, or MLX affine dequantized as w = scale * q + bias from the stored
bf16 scales/biases.
"""
import argparse
import copy
import io
import json
import lzma
import math
import os
import struct
import sys
import tarfile

import numpy as np

N_GREEDY = 16
N_TOP = 20
MARGIN_MIN_FIXTURE = 0.05  # every greedy step of the goldens: top1 - top2 logit at least this (tests allow 0.02)
SENSITIVITY_MIN = 0.05  # each dropped feature must move a top-20 logprob by at least this (50x the test tolerance)

# ---------------------------------------------------------------------------------------------------------------
# bf16 and MLX affine quantization


def f32_to_bf16_bits(a):
    """float32 -> bf16 bits, round to nearest even (the data never holds NaN)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_bits_to_f64(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def mlx_quantize(w, group_size, bits):
    """MLX's affine quantizer (its CPU path) as FIXTURES.md states it, in float32.
    Returns (packed uint32 [rows][cols*bits/32], scales bf16 bits, biases bf16 bits)."""
    rows, cols = w.shape
    assert cols % group_size == 0 and (cols * bits) % 32 == 0
    g = w.astype(np.float32).reshape(rows, cols // group_size, group_size)
    n_bins = np.float32(2 ** bits - 1)
    w_min = g.min(axis=-1)
    w_max = g.max(axis=-1)
    scale = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7)).astype(np.float32)
    side = np.abs(w_min) > np.abs(w_max)
    scale = np.where(side, scale, -scale).astype(np.float32)
    edge = np.where(side, w_min, w_max).astype(np.float32)
    q0 = np.rint(edge / scale).astype(np.float32)
    nz = q0 != 0
    scale = np.where(nz, edge / np.where(nz, q0, np.float32(1)), scale).astype(np.float32)
    bias = np.where(nz, edge, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint((g - bias[..., None]) / scale[..., None]), 0, n_bins).astype(np.uint32)
    q = q.reshape(rows, cols)
    per_word = 32 // bits
    q = q.reshape(rows, cols // per_word, per_word)
    packed = np.zeros((rows, cols // per_word), dtype=np.uint32)
    for k in range(per_word):  # codes low bits first
        packed |= q[:, :, k] << np.uint32(bits * k)
    return packed, f32_to_bf16_bits(scale), f32_to_bf16_bits(bias)


def mlx_dequantize(packed, scales_bits, biases_bits, group_size, bits):
    """Exactly what the stored bytes mean, in float64: w = scale * q + bias."""
    rows, words = packed.shape
    per_word = 32 // bits
    cols = words * per_word
    mask = np.uint32(2 ** bits - 1)
    q = np.empty((rows, words, per_word), dtype=np.float64)
    for k in range(per_word):
        q[:, :, k] = (packed >> np.uint32(bits * k)) & mask
    q = q.reshape(rows, cols // group_size, group_size)
    s = bf16_bits_to_f64(scales_bits)[..., None]
    b = bf16_bits_to_f64(biases_bits)[..., None]
    return (s * q + b).reshape(rows, cols)


# ---------------------------------------------------------------------------------------------------------------
# safetensors writer (sorted keys, consecutive offsets in key order, header padded with spaces to 8 bytes)


def safetensors_bytes(tensors, metadata=None):
    """tensors: dict name -> (dtype string, shape list, bytes)."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    off = 0
    blobs = []
    for name in sorted(tensors):
        dt, shape, data = tensors[name]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
        blobs.append(data)
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


# ---------------------------------------------------------------------------------------------------------------
# models


class Shape:
    def __init__(self, name, seed, arch, dim, n_heads, n_kv_heads, head_dim, hidden, vocab, n_layers, tied, bits=0,
                 group_size=0, rope_theta=10000.0, rope=None, new_config=False, eps=1e-6, explicit_head_dim=True,
                 prompt_lens=(5, 23, 70), shards=0, qk_gain=1.0, bias_std=0.0, eos=None, gen_eos=None,
                 llama_bias=False):
        self.__dict__.update(locals())
        del self.__dict__["self"]


SHAPES = [
    # a. Llama, 6 heads / 2 kv heads (GQA 3:1), untied, bf16, classic config without head_dim / rope_theta keys
    Shape("llama-gqa-untied", 101, "llama", dim=60, n_heads=6, n_kv_heads=2, head_dim=10, hidden=52, vocab=307,
          n_layers=2, tied=False, eps=1e-5, explicit_head_dim=False, rope_theta=None, qk_gain=2.0,
          eos=2, prompt_lens=(4, 19, 72)),
    # b. Llama MQA with Llama 3.1 rope scaling (original context 64, so every band is exercised at head_dim 16)
    Shape("llama-mqa-rope-llama3", 102, "llama", dim=64, n_heads=4, n_kv_heads=1, head_dim=16, hidden=48, vocab=300,
          n_layers=2, tied=True, eps=1e-5, rope_theta=500000.0, explicit_head_dim=False, qk_gain=2.5,
          rope={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64},
          eos=[1, 7], gen_eos=[7, 9], prompt_lens=(6, 33, 90)),
    # c. Qwen3, newer config form, head_dim 24 != 64/4, MLX 8-bit group 32, tied embeddings quantized too
    Shape("qwen3-q8-g32-newcfg", 103, "qwen3", dim=64, n_heads=4, n_kv_heads=2, head_dim=24, hidden=64, vocab=320,
          n_layers=3, tied=True, bits=8, group_size=32, rope_theta=1000000.0, new_config=True, qk_gain=1.5,
          eos=5, prompt_lens=(3, 21, 75)),
    # d. Qwen3 MLX 4-bit group 128, untied (lm_head quantized)
    Shape("qwen3-q4-g128-untied", 104, "qwen3", dim=128, n_heads=4, n_kv_heads=2, head_dim=32, hidden=128, vocab=256,
          n_layers=2, tied=False, bits=4, group_size=128, rope_theta=1000000.0, qk_gain=1.5,
          eos=[3], prompt_lens=(5, 17, 70)),
    # e. Qwen2 with q/k/v biases, 7 heads / 7 kv heads (MHA), bf16, tied
    Shape("qwen2-bias-mha", 105, "qwen2", dim=56, n_heads=7, n_kv_heads=7, head_dim=8, hidden=48, vocab=301,
          n_layers=2, tied=True, rope_theta=1000000.0, explicit_head_dim=False, qk_gain=2.0, bias_std=0.5,
          eos=4, prompt_lens=(7, 25, 71)),
    # g. Llama with attention_bias (q/k/v/o biases) and mlp_bias (gate/up/down biases), bf16, tied
    Shape("llama-biases", 106, "llama", dim=64, n_heads=4, n_kv_heads=2, head_dim=16, hidden=80, vocab=290,
          n_layers=2, tied=True, eps=1e-5, rope_theta=10000.0, qk_gain=2.0, bias_std=0.5, llama_bias=True,
          eos=2, prompt_lens=(5, 22, 70)),
]
# f. the same weights as (e), as model.safetensors.index.json + 2 shards
SHARDED = ("qwen2-bias-mha-sharded", "qwen2-bias-mha")


def config_json(s):
    arch_class = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[s.arch]
    c = {
        "architectures": [arch_class],
        "model_type": s.arch,
        "hidden_size": s.dim,
        "intermediate_size": s.hidden,
        "num_hidden_layers": s.n_layers,
        "num_attention_heads": s.n_heads,
        "num_key_value_heads": s.n_kv_heads,
        "vocab_size": s.vocab,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": s.eps,
        "tie_word_embeddings": s.tied,
        "bos_token_id": 0,
        "eos_token_id": s.eos,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if s.explicit_head_dim:
        c["head_dim"] = s.head_dim
    if s.arch == "llama":
        c["attention_bias"] = s.llama_bias
        c["mlp_bias"] = s.llama_bias
    if s.arch in ("qwen2", "qwen3"):
        c["use_sliding_window"] = False
        c["sliding_window"] = None
        c["max_window_layers"] = s.n_layers
    if s.new_config:
        rp = {"rope_type": "default", "rope_theta": s.rope_theta}
        if s.rope:
            rp.update(s.rope)
        c["rope_parameters"] = rp
        c["dtype"] = "bfloat16"
        c["layer_types"] = ["full_attention"] * s.n_layers
        c["transformers_version"] = "5.0.0"
    else:
        if s.rope_theta is not None:
            c["rope_theta"] = s.rope_theta
        c["rope_scaling"] = s.rope
        c["torch_dtype"] = "bfloat16"
        c["transformers_version"] = "4.51.0"
    if s.bits:
        c["quantization"] = {"group_size": s.group_size, "bits": s.bits}
        c["quantization_config"] = {"group_size": s.group_size, "bits": s.bits}
    return c


def make_weights(s):
    """Returns (tensors for the file: name -> (dtype, shape, bytes), float64 weights for the reference)."""
    rng = np.random.default_rng(s.seed)
    q_dim, kv_dim = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    tensors, ref = {}, {}

    def dense(name, rows, cols, std):
        w = (rng.standard_normal((rows, cols)) * std).astype(np.float32)
        if s.bits:
            packed, sc, bi = mlx_quantize(w, s.group_size, s.bits)
            tensors[name + ".weight"] = ("U32", packed.shape, packed.astype("<u4").tobytes())
            tensors[name + ".scales"] = ("BF16", sc.shape, sc.astype("<u2").tobytes())
            tensors[name + ".biases"] = ("BF16", bi.shape, bi.astype("<u2").tobytes())
            ref[name] = mlx_dequantize(packed, sc, bi, s.group_size, s.bits)
        else:
            bits = f32_to_bf16_bits(w)
            tensors[name + ".weight"] = ("BF16", bits.shape, bits.astype("<u2").tobytes())
            ref[name] = bf16_bits_to_f64(bits)

    def vector(name, v):
        bits = f32_to_bf16_bits(v.astype(np.float32))
        tensors[name] = ("BF16", bits.shape, bits.astype("<u2").tobytes())
        ref[name] = bf16_bits_to_f64(bits)

    # tied: the embedding is also the output matrix, so its scale sets the logits' spread
    emb_std = 3.0 / math.sqrt(s.dim) if s.tied else 1.0
    dense("model.embed_tokens", s.vocab, s.dim, emb_std)
    for l in range(s.n_layers):
        p = "model.layers.%d." % l
        vector(p + "input_layernorm.weight", rng.uniform(0.6, 1.4, s.dim))
        vector(p + "post_attention_layernorm.weight", rng.uniform(0.6, 1.4, s.dim))
        dense(p + "self_attn.q_proj", q_dim, s.dim, s.qk_gain / math.sqrt(s.dim))
        dense(p + "self_attn.k_proj", kv_dim, s.dim, s.qk_gain / math.sqrt(s.dim))
        dense(p + "self_attn.v_proj", kv_dim, s.dim, 1.0 / math.sqrt(s.dim))
        dense(p + "self_attn.o_proj", s.dim, q_dim, 1.0 / math.sqrt(q_dim))
        dense(p + "mlp.gate_proj", s.hidden, s.dim, 1.0 / math.sqrt(s.dim))
        dense(p + "mlp.up_proj", s.hidden, s.dim, 1.0 / math.sqrt(s.dim))
        dense(p + "mlp.down_proj", s.dim, s.hidden, 1.0 / math.sqrt(s.hidden))
        if s.arch == "qwen3":
            vector(p + "self_attn.q_norm.weight", rng.uniform(0.5, 2.5, s.head_dim))
            vector(p + "self_attn.k_norm.weight", rng.uniform(0.5, 2.5, s.head_dim))
        if s.arch == "qwen2" or s.llama_bias:
            vector(p + "self_attn.q_proj.bias", rng.standard_normal(q_dim) * s.bias_std)
            vector(p + "self_attn.k_proj.bias", rng.standard_normal(kv_dim) * s.bias_std)
            vector(p + "self_attn.v_proj.bias", rng.standard_normal(kv_dim) * s.bias_std)
        if s.llama_bias:
            vector(p + "self_attn.o_proj.bias", rng.standard_normal(s.dim) * s.bias_std)
            vector(p + "mlp.gate_proj.bias", rng.standard_normal(s.hidden) * s.bias_std)
            vector(p + "mlp.up_proj.bias", rng.standard_normal(s.hidden) * s.bias_std)
            vector(p + "mlp.down_proj.bias", rng.standard_normal(s.dim) * s.bias_std)
    vector("model.norm.weight", rng.uniform(0.6, 1.4, s.dim))
    if not s.tied:
        dense("lm_head", s.vocab, s.dim, 3.0 / math.sqrt(s.dim))
    return tensors, ref


# ---------------------------------------------------------------------------------------------------------------
# the float64 reference


def rope_inv_freq(s, rope_override=None):
    """Hugging Face modeling_rope_utils: default, linear and llama3, in float64."""
    theta = s.rope_theta if s.rope_theta is not None else 10000.0
    d = s.head_dim
    inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rope = s.rope if rope_override is None else rope_override
    rtype = (rope or {}).get("rope_type", "default")
    if rtype == "default":
        return inv_freq
    if rtype == "linear":
        return inv_freq / rope["factor"]
    if rtype == "llama3":
        factor = rope["factor"]
        low, high = rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        low_freq_wavelen = old / low
        high_freq_wavelen = old / high
        wavelen = 2 * math.pi / inv_freq
        # longer than low_freq_wavelen: divided by factor; shorter than high_freq_wavelen: kept; between: smoothed
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(medium, smoothed, scaled)
    raise ValueError("rope type %s" % rtype)


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def forward(s, W, ids, drop=None):
    """Logits [T][vocab] for token ids, float64. drop names one feature to leave out (sensitivity checks only)."""
    ids = np.asarray(ids)
    T, H, KV, hd = len(ids), s.n_heads, s.n_kv_heads, s.head_dim
    if drop == "rope_scaling":
        inv_freq = rope_inv_freq(s, rope_override={"rope_type": "default"})
    else:
        inv_freq = rope_inv_freq(s)
    freqs = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
    if drop == "rope":
        cos, sin = np.ones_like(cos), np.zeros_like(sin)
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    x = W["model.embed_tokens"][ids]
    for l in range(s.n_layers):
        p = "model.layers.%d." % l
        h = rmsnorm(x, W[p + "input_layernorm.weight"], s.eps)
        q = h @ W[p + "self_attn.q_proj"].T
        k = h @ W[p + "self_attn.k_proj"].T
        v = h @ W[p + "self_attn.v_proj"].T
        if (s.arch == "qwen2" or s.llama_bias) and drop != "bias":
            q = q + W[p + "self_attn.q_proj.bias"]
            k = k + W[p + "self_attn.k_proj.bias"]
            v = v + W[p + "self_attn.v_proj.bias"]
        q = q.reshape(T, H, hd)
        k = k.reshape(T, KV, hd)
        v = v.reshape(T, KV, hd)
        if s.arch == "qwen3" and drop != "qk_norm":
            q = rmsnorm(q, W[p + "self_attn.q_norm.weight"], s.eps)
            k = rmsnorm(k, W[p + "self_attn.k_norm.weight"], s.eps)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        group = H // KV
        out = np.empty((T, H, hd))
        for hh in range(H):
            kvh = hh % KV if drop == "kv_map" else hh // group
            scores = (q[:, hh, :] @ k[:, kvh, :].T) / math.sqrt(hd) + mask
            scores = scores - scores.max(axis=-1, keepdims=True)
            pr = np.exp(scores)
            pr = pr / pr.sum(axis=-1, keepdims=True)
            out[:, hh, :] = pr @ v[:, kvh, :]
        o = out.reshape(T, H * hd) @ W[p + "self_attn.o_proj"].T
        lb = s.llama_bias and drop != "bias"
        if lb:
            o = o + W[p + "self_attn.o_proj.bias"]
        x = x + o
        h = rmsnorm(x, W[p + "post_attention_layernorm.weight"], s.eps)
        g = h @ W[p + "mlp.gate_proj"].T
        u = h @ W[p + "mlp.up_proj"].T
        if lb:
            g = g + W[p + "mlp.gate_proj.bias"]
            u = u + W[p + "mlp.up_proj.bias"]
        d = ((g / (1.0 + np.exp(-g))) * u) @ W[p + "mlp.down_proj"].T
        if lb:
            d = d + W[p + "mlp.down_proj.bias"]
        x = x + d
    x = rmsnorm(x, W["model.norm.weight"], s.eps)
    head = W["model.embed_tokens"] if (s.tied or drop == "untied") else W["lm_head"]
    return x @ head.T


def logsumexp(z):
    m = z.max()
    return float(m + np.log(np.sum(np.exp(z - m))))


def top_ids(z, k):
    # most likely first, ties: lower id first
    return [int(i) for i in np.lexsort((np.arange(len(z)), -z))[:k]]


def make_case(s, W, prompt, with_all_logits):
    z = forward(s, W, prompt)[-1]
    top = top_ids(z, N_TOP)
    case = {
        "prompt_ids": [int(t) for t in prompt],
        "top20_ids": top,
        "top20_logits": [float(z[i]) for i in top],
        "logsumexp": logsumexp(z),
    }
    if with_all_logits:
        case["all_logits"] = [float(v) for v in z]
    seq, greedy, margins = list(prompt), [], []
    for step in range(N_GREEDY):
        if step > 0:
            z = forward(s, W, seq)[-1]
        t2 = top_ids(z, 2)
        greedy.append(t2[0])
        margins.append(float(z[t2[0]] - z[t2[1]]))
        seq.append(t2[0])
    case["greedy_ids"] = greedy
    case["greedy_margins"] = margins
    return case


def sensitivity(s, W, prompt):
    """For each feature this shape exercises, the largest change of a top-20 logprob when it is dropped."""
    feats = ["rope"]
    if s.rope:
        feats.append("rope_scaling")
    if s.n_kv_heads not in (1, s.n_heads):
        feats.append("kv_map")
    if s.arch == "qwen3":
        feats.append("qk_norm")
    if s.arch == "qwen2" or s.llama_bias:
        feats.append("bias")
    if not s.tied:
        feats.append("untied")
    z = forward(s, W, prompt)[-1]
    lp = z - logsumexp(z)
    top = top_ids(z, N_TOP)
    out = {}
    for f in feats:
        z2 = forward(s, W, prompt, drop=f)[-1]
        lp2 = z2 - logsumexp(z2)
        out[f] = float(np.max(np.abs(lp[top] - lp2[top])))
        if out[f] < SENSITIVITY_MIN:
            raise SystemExit("%s: dropping %s moves the top-20 logprobs by only %.4f" % (s.name, f, out[f]))
    return out


def expect(s):
    e = {"arch": s.arch, "dim": s.dim, "n_layers": s.n_layers, "n_heads": s.n_heads, "n_kv_heads": s.n_kv_heads,
         "head_dim": s.head_dim, "hidden_dim": s.hidden, "vocab_size": s.vocab, "tie_embeddings": s.tied,
         "q_bits": s.bits, "q_group_size": s.group_size,
         "attn_bias": s.arch == "qwen2" or s.llama_bias, "o_bias": s.llama_bias, "mlp_bias": s.llama_bias,
         "rope_type": (s.rope or {}).get("rope_type", "default"),
         "rope_theta": s.rope_theta if s.rope_theta is not None else 10000.0,
         "eos_ids": sorted(set((s.eos if isinstance(s.eos, list) else [s.eos]) + (s.gen_eos or [])))}
    return e


def build_model(s):
    """Returns {relative path: bytes} for one model folder, and its goldens dict."""
    tensors, W = make_weights(s)
    files = {"config.json": (json.dumps(config_json(s), indent=2, sort_keys=True) + "\n").encode()}
    if s.gen_eos:
        files["generation_config.json"] = (json.dumps({"bos_token_id": 0, "eos_token_id": s.gen_eos}, indent=2) + "\n").encode()
    files["model.safetensors"] = safetensors_bytes(tensors, {"format": "mlx" if s.bits else "pt"})
    # prompts are drawn until every greedy step has a clear margin, so that the whole decode is compared
    prng = np.random.default_rng(s.seed + 1000)
    prompts, cases = [], []
    for i, n in enumerate(s.prompt_lens):
        for _ in range(100):
            p = prng.integers(0, s.vocab, n)
            case = make_case(s, W, p, i == 0)
            if min(case["greedy_margins"]) >= MARGIN_MIN_FIXTURE:
                break
        else:
            raise SystemExit("%s: no prompt of %d tokens with greedy margins >= %g" % (s.name, n, MARGIN_MIN_FIXTURE))
        prompts.append(p)
        cases.append(case)
    goldens = {
        "meta": {
            "model": s.name,
            "generator": "tools/shapes/make_shape_fixtures.py (float64 numpy reference)",
            "config": config_json(s),
            "expect": expect(s),
            "rope_inv_freq": [float(v) for v in rope_inv_freq(s)],
            "sensitivity": sensitivity(s, W, prompts[-1]),
        },
        "cases": cases,
    }
    return files, tensors, goldens


def shard_files(base_files, tensors, n_shards=2):
    """The same tensors split over n shards: the embedding and the first layer in shard 1, the rest in shard 2."""
    names = sorted(tensors)
    first = [n for n in names if n.startswith("model.embed_tokens") or n.startswith("model.layers.0.")]
    groups = [first, [n for n in names if n not in first]]
    assert n_shards == 2 and all(groups)
    files = {k: v for k, v in base_files.items() if k != "model.safetensors"}
    weight_map, total = {}, 0
    for i, g in enumerate(groups):
        fname = "model-%05d-of-%05d.safetensors" % (i + 1, n_shards)
        files[fname] = safetensors_bytes({n: tensors[n] for n in g}, {"format": "pt"})
        for n in g:
            weight_map[n] = fname
            total += len(tensors[n][2])
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    files["model.safetensors.index.json"] = (json.dumps(index, indent=2) + "\n").encode()
    return files


def build_all():
    """{path under shapes/: bytes} for every model."""
    out = {}
    built = {}
    for s in SHAPES:
        files, tensors, goldens = build_model(s)
        built[s.name] = (files, tensors, goldens)
        for k, v in files.items():
            out["%s/%s" % (s.name, k)] = v
        out["%s/goldens.json" % s.name] = (json.dumps(goldens, indent=1) + "\n").encode()
        sys.stderr.write("%-24s %7d bytes of weights, sensitivity %s\n" % (
            s.name, sum(len(t[2]) for t in tensors.values()),
            ", ".join("%s %.3f" % kv for kv in goldens["meta"]["sensitivity"].items())))
    name, base = SHARDED
    files, tensors, goldens = built[base]
    g = copy.deepcopy(goldens)
    g["meta"]["model"] = name
    g["meta"]["sharded_from"] = base
    for k, v in shard_files(files, tensors).items():
        out["%s/%s" % (name, k)] = v
    out["%s/goldens.json" % name] = (json.dumps(g, indent=1) + "\n").encode()
    return out


def tar_xz(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        dirs = sorted({"shapes"} | {"shapes/" + p.rsplit("/", 1)[0] for p in files})
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = tarfile.DIRTYPE, 0o755, 0, 0, 0, "", ""
            tar.addfile(ti)
        for p in sorted(files):
            ti = tarfile.TarInfo("shapes/" + p)
            ti.size, ti.mode, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = len(files[p]), 0o644, 0, 0, 0, "", ""
            tar.addfile(ti, io.BytesIO(files[p]))
    return lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                         preset=9 | lzma.PRESET_EXTREME)


# ---------------------------------------------------------------------------------------------------------------
# validation of the reference against transformers' own goldens (the trained fixtures)


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    base = 8 + hlen
    np_dt = {"F32": "<f4", "F16": "<f2", "U32": "<u4", "F64": "<f8"}
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        b, e = t["data_offsets"]
        buf = raw[base + b:base + e]
        if t["dtype"] == "BF16":
            a = bf16_bits_to_f64(np.frombuffer(buf, dtype="<u2")).reshape(t["shape"])
            out[name] = ("BF16", a, np.frombuffer(buf, dtype="<u2").reshape(t["shape"]))
        else:
            a = np.frombuffer(buf, dtype=np_dt[t["dtype"]]).reshape(t["shape"])
            out[name] = (t["dtype"], a.astype(np.float64) if t["dtype"] != "U32" else a, a)
    return out


def shape_from_config(c):
    rp = c.get("rope_parameters") or {}
    rope = rp if rp.get("rope_type", "default") != "default" else c.get("rope_scaling")
    theta = rp.get("rope_theta", c.get("rope_theta", 10000.0))
    q = c.get("quantization") or {}
    return Shape(c.get("_name_or_path") or "validate", 0, c["model_type"], dim=c["hidden_size"],
                 n_heads=c["num_attention_heads"], n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                 head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                 hidden=c["intermediate_size"], vocab=c["vocab_size"], n_layers=c["num_hidden_layers"],
                 tied=bool(c.get("tie_word_embeddings", False)), bits=q.get("bits", 0), group_size=q.get("group_size", 0),
                 rope_theta=theta, rope=rope, eps=c.get("rms_norm_eps", 1e-6))


def validate(model_dir, goldens_path, key):
    with open(os.path.join(model_dir, "config.json")) as f:
        s = shape_from_config(json.load(f))
    raw = read_safetensors(os.path.join(model_dir, "model.safetensors"))
    W = {}
    for name, (dt, a, bits) in raw.items():
        if name.endswith(".scales") or name.endswith(".biases"):
            continue
        base = name[:-len(".weight")] if name.endswith(".weight") else name
        if dt == "U32":
            W[base] = mlx_dequantize(bits, raw[base + ".scales"][2], raw[base + ".biases"][2], s.group_size, s.bits)
        elif name.endswith(".weight") and a.ndim == 2:
            W[base] = a
        else:
            W[name] = a
    with open(goldens_path) as f:
        cases = json.load(f)["cases"]
    if key:
        cases = cases[key]
    worst, n_greedy, n_ok = 0.0, 0, 0
    for c in cases:
        seq = list(c["prompt_ids"])
        z = forward(s, W, seq)[-1]
        lp = z - logsumexp(z)
        for i, zi in zip(c["top20_ids"], c["top20_logits"]):
            worst = max(worst, abs(lp[i] - (zi - c["logsumexp"])))
        for step, (gid, margin) in enumerate(zip(c["greedy_ids"], c["greedy_margins"])):
            if step > 0:
                z = forward(s, W, seq)[-1]
            t = top_ids(z, 1)[0]
            n_greedy += 1
            if t != gid:
                if margin >= 0.02:
                    raise SystemExit("greedy step %d: %d, transformers %d (margin %.4f)" % (step, t, gid, margin))
                break
            n_ok += 1
            seq.append(gid)
    sys.stderr.write("%s: %d cases, top-20 logprobs within %.2e of transformers, %d/%d greedy ids equal\n" % (
        model_dir, len(cases), worst, n_ok, n_greedy))
    return 0 if worst < 1e-4 else 1


# ---------------------------------------------------------------------------------------------------------------
# fuzz seeds


def fuzz_corpus(outdir):
    rng = np.random.default_rng(7)
    os.makedirs(outdir, exist_ok=True)
    seeds = {
        "empty-header.safetensors": safetensors_bytes({}),
        "one-f32.safetensors": safetensors_bytes({"w": ("F32", [2, 3], rng.standard_normal(6).astype("<f4").tobytes())}),
        "metadata-scalar.safetensors": safetensors_bytes(
            {"s": ("BF16", [], f32_to_bf16_bits(np.float32([1.5])).tobytes()), "z": ("I64", [0], b"")},
            {"format": "pt", "note": "seed"}),
        "mixed-dtypes.safetensors": safetensors_bytes({
            "a.u8": ("U8", [3], bytes([1, 2, 3])),  # leaves the next tensor misaligned
            "b.f16": ("F16", [2, 2], rng.standard_normal(4).astype("<f2").tobytes()),
            "c.i32": ("I32", [1, 1, 2], np.array([7, -7], dtype="<i4").tobytes()),
            "d.bool": ("BOOL", [2], bytes([0, 1])),
            "e.f64": ("F64", [1], np.array([2.5], dtype="<f8").tobytes()),
        }),
    }
    w = rng.standard_normal((2, 64)).astype(np.float32)
    packed, sc, bi = mlx_quantize(w, 32, 4)
    seeds["mlx-q4.safetensors"] = safetensors_bytes({
        "layer.weight": ("U32", list(packed.shape), packed.astype("<u4").tobytes()),
        "layer.scales": ("BF16", list(sc.shape), sc.astype("<u2").tobytes()),
        "layer.biases": ("BF16", list(bi.shape), bi.astype("<u2").tobytes()),
    }, {"format": "mlx"})
    for name, data in seeds.items():
        with open(os.path.join(outdir, name), "wb") as f:
            f.write(data)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.normpath(os.path.join(here, "..", ".."))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(root, "tests", "fixtures", "shapes.tar.xz"))
    ap.add_argument("--dir", help="also write the unpacked tree (DIR/shapes/...)")
    ap.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    ap.add_argument("--fuzz-corpus", metavar="DIR", help="write the safetensors fuzz seeds into DIR and exit")
    ap.add_argument("--validate", nargs="+", metavar="ARG", help="MODEL_DIR GOLDENS [KEY]: run the reference on a "
                    "model and compare with goldens made by transformers")
    a = ap.parse_args()
    if a.validate:
        if len(a.validate) not in (2, 3):
            ap.error("--validate takes MODEL_DIR GOLDENS [KEY]")
        return validate(a.validate[0], a.validate[1], a.validate[2] if len(a.validate) == 3 else None)
    if a.fuzz_corpus:
        fuzz_corpus(a.fuzz_corpus)
        return 0
    files = build_all()
    blob = tar_xz(files)
    if a.dir:
        for p, data in files.items():
            path = os.path.join(a.dir, "shapes", p)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
    if a.check:
        with open(a.out, "rb") as f:
            same = f.read() == blob
        sys.stderr.write("%s: %s\n" % (a.out, "identical" if same else "DIFFERS from a fresh run"))
        return 0 if same else 1
    with open(a.out, "wb") as f:
        f.write(blob)
    sys.stderr.write("%s: %d bytes\n" % (a.out, len(blob)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
