"""GLM-4 (GLM-4-9B-Chat) and GLM-4V-9B in plain PyTorch, with the official module and parameter names.

Module names equal the official checkpoint's (`transformer.encoder.layers.N.self_attention.query_key_value`,
`transformer.vision...`), so the official safetensors load by name and PEFT adapters get the keys PEFT
gives on the official remote-code model. Shapes in comments: B batch, T tokens, H heads, G KV groups,
D head dim, C hidden.

Images (GLM-4V): the template has already expanded each `<|begin_of_image|><|endoftext|><|end_of_image|>`
span to 2 + num_patches positions and marked them in `image_mask`; the vision tower's output (learned boi,
patches, learned eoi) replaces the embeddings there. Position ids come from the template too (all patches
share one position id, as upstream), so the model itself needs no knowledge of the prompt format.
Packed rows (data.packing) come without an attention mask: each sample starts where its positions restart at 0
and attends only to itself (glmtune.models.packed_attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.utils import ModelOutput

from glmtune.models.glm4v.config import Glm4Config
from glmtune.models.glm4v.vision import EVA2CLIPModel
from glmtune.models.packed_attention import PackedRows, segment_spans, varlen_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x * torch.rsqrt(variance + self.eps))).to(x.dtype)


def rope_cos_sin(position_ids, cfg: Glm4Config, dtype):
    """cos/sin (B, T, rotary_dim/2) for base 10000 * rope_ratio (the stored inv_freq buffer ignores rope_ratio)."""
    dim = cfg.rotary_dim
    base = 10000.0 * cfg.rope_ratio
    theta = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim))
    angles = position_ids.float()[..., None] * theta
    cos, sin = torch.cos(angles), torch.sin(angles)
    if dtype in (torch.float16, torch.bfloat16):  # upstream rounds its cache to the model dtype
        cos, sin = cos.to(dtype), sin.to(dtype)
    return cos, sin


def apply_rope(x, cos, sin):
    """Rotate the first rotary_dim dims of each head as interleaved pairs (0,1), (2,3), ...; x: (B, H, T, D)."""
    rot = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    pairs = x_rot.reshape(*x_rot.shape[:-1], rot // 2, 2)
    c, s = cos[:, None], sin[:, None]  # (B, 1, T, rot/2)
    out = torch.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 1] * c + pairs[..., 0] * s], dim=-1)
    return torch.cat([out.flatten(-2).to(x.dtype), x_pass], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, cfg: Glm4Config):
        super().__init__()
        self.cfg = cfg
        self.q_size = cfg.num_attention_heads * cfg.head_dim
        self.kv_size = cfg.kv_groups * cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size,
                                         bias=cfg.add_qkv_bias or cfg.add_bias_linear)
        self.dense = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.add_bias_linear)

    def forward(self, x, cos, sin, mask, past=None):
        B, T, _ = x.shape
        H, G, D = self.cfg.num_attention_heads, self.cfg.kv_groups, self.cfg.head_dim
        q, k, v = self.query_key_value(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(B, T, H, D).transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = apply_rope(k.view(B, T, G, D).transpose(1, 2), cos, sin)  # (B, G, T, D)
        v = v.view(B, T, G, D).transpose(1, 2)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        present = (k, v)
        # each KV group serves H/G consecutive query heads
        k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
        if isinstance(mask, PackedRows):  # packed samples: causal attention inside each, nothing across
            y = varlen_attention(_causal_segment, q, k, v, mask).reshape(B, T, self.q_size)
            return self.dense(y), present
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(y.transpose(1, 2).reshape(B, T, self.q_size)), present


def _causal_segment(q, k, v, _mask):
    return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: Glm4Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, bias=cfg.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=cfg.add_bias_linear)

    def forward(self, x):
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)  # SwiGLU: [gate | up]
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, cfg: Glm4Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.self_attention = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, past=None):
        attn, present = self.self_attention(self.input_layernorm(x), cos, sin, mask, past)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), present


class GLMTransformer(nn.Module):
    def __init__(self, cfg: Glm4Config):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.gradient_checkpointing = False

    def forward(self, x, cos, sin, mask, past=None):
        presents = []
        for i, layer in enumerate(self.layers):
            layer_past = past[i] if past is not None else None
            if self.gradient_checkpointing and self.training:
                x, present = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, layer_past,
                                                               use_reentrant=False)
            else:
                x, present = layer(x, cos, sin, mask, layer_past)
            presents.append(present)
        return self.final_layernorm(x), presents


class Embedding(nn.Module):
    def __init__(self, cfg: Glm4Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids)


class RotaryEmbedding(nn.Module):
    """Holds the official checkpoint's `rotary_pos_emb.inv_freq` buffer (loaded, never used by the math)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)))


def attention_mask_4d(attention_mask, q_len: int, past_len: int):
    """Bool (B, 1, Tq, Tk), True = attend: causal over past + current keys, padding keys masked.

    Query rows that are themselves padding attend everywhere (as upstream), which avoids NaN rows.
    """
    k_len = past_len + q_len
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=attention_mask.device).tril(past_len)
    keys = attention_mask[:, None, None, :k_len].bool()
    mask = causal[None, None] & keys
    query_is_pad = ~attention_mask[:, None, past_len:past_len + q_len, None].bool()
    return mask | query_is_pad


class PrefixEncoder(nn.Module):
    """P-tuning v2: per-layer prefix keys and values, `transformer.prefix_encoder` as upstream names it.

    One row per virtual token holds, for every layer, its key and value for each KV group:
    (num_layers * 2 * groups * head_dim); with `projection`, a 2-layer MLP reparameterises the rows while
    training (upstream's prefix_projection). Prefix keys are not rotated, as upstream feeds them as past keys.
    """

    def __init__(self, cfg: Glm4Config, pre_seq_len: int, projection: bool):
        super().__init__()
        self.cfg, self.pre_seq_len = cfg, pre_seq_len
        width = cfg.num_layers * 2 * cfg.kv_groups * cfg.head_dim
        self.embedding = nn.Embedding(pre_seq_len, width)
        if projection:
            self.trans = nn.Sequential(nn.Linear(width, cfg.hidden_size), nn.Tanh(), nn.Linear(cfg.hidden_size, width))

    def table(self) -> torch.Tensor:
        """(pre_seq_len, width): the effective prefix (what an export writes as embedding.weight). The submodules
        are called, not their weights read, so that DeepSpeed ZeRO-3 gathers them like any module's."""
        rows = self.embedding(torch.arange(self.pre_seq_len, device=self.embedding.weight.device))
        return self.trans(rows) if hasattr(self, "trans") else rows

    def forward(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.cfg
        kv = self.table().view(self.pre_seq_len, c.num_layers * 2, c.kv_groups, c.head_dim)
        kv = kv.permute(1, 2, 0, 3)[:, None].expand(-1, batch_size, -1, -1, -1)  # (2L, B, G, P, D)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(c.num_layers)]


@dataclass
class Glm4Output(ModelOutput):  # a ModelOutput (a dict) so DeepSpeed ZeRO-3 hooks can see the tensors
    logits: torch.Tensor | None = None
    past_key_values: list | None = None


class ChatGLMModel(nn.Module):
    def __init__(self, cfg: Glm4Config):
        super().__init__()
        self.cfg = cfg
        self.embedding = Embedding(cfg)
        self.rotary_pos_emb = RotaryEmbedding(cfg.rotary_dim)
        self.encoder = GLMTransformer(cfg)
        self.output_layer = nn.Linear(cfg.hidden_size, cfg.padded_vocab_size, bias=False)
        if cfg.vision_config is not None:
            self.vision = EVA2CLIPModel(cfg)
        if cfg.pre_seq_len:
            self.prefix_encoder = PrefixEncoder(cfg, cfg.pre_seq_len, cfg.prefix_projection)


class ChatGLMForConditionalGeneration(nn.Module):
    """forward(input_ids, position_ids, attention_mask, images, image_mask, past_key_values) -> logits."""

    supports_gradient_checkpointing = True

    def __init__(self, cfg: Glm4Config):
        super().__init__()
        self.config = cfg
        self.transformer = ChatGLMModel(cfg)

    def get_input_embeddings(self):
        return self.transformer.embedding.word_embeddings

    def gradient_checkpointing_enable(self, **_):
        self.transformer.encoder.gradient_checkpointing = True

    def enable_input_require_grads(self):
        self.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))

    def embed(self, input_ids, images=None, image_mask=None):
        x = self.transformer.embedding(input_ids)  # (B, T, C)
        if images is not None:
            if image_mask is None:
                raise ValueError("images given without image_mask (the expanded image positions)")
            vision = self.transformer.vision(images.to(x.dtype))  # (n_images, 2 + patches, C)
            x = x.masked_scatter(image_mask[..., None].to(x.device), vision.to(x.dtype).reshape(-1, x.shape[-1]))
        return x

    def forward(self, input_ids, position_ids=None, attention_mask=None, images=None, image_mask=None,
                past_key_values=None, use_cache: bool = False, **_):
        B, T = input_ids.shape
        x = self.embed(input_ids, images, image_mask)
        prefix = getattr(self.transformer, "prefix_encoder", None)
        if prefix is not None and not past_key_values:  # P-tuning v2: the prefix is the first cache entry
            past_key_values = [(k.to(x.dtype), v.to(x.dtype)) for k, v in prefix(B)]
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        packed = attention_mask is None and position_ids is not None and not past_len  # (no P-tuning prefix then)
        if position_ids is None:  # positions count the user's tokens only, never the prefix
            start = past_len - (prefix.pre_seq_len if prefix is not None else 0)
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.config, x.dtype)
        if attention_mask is None:
            attention_mask = torch.ones(B, past_len + T, dtype=torch.long, device=input_ids.device)
        elif prefix is not None:  # callers pass the mask of their own tokens: every token sees the prefix
            attention_mask = torch.cat([attention_mask.new_ones(B, prefix.pre_seq_len), attention_mask], dim=1)
        if packed:  # a packed batch: samples start where their positions restart at 0
            mask = PackedRows(segment_spans(position_ids))
        elif not past_len and bool(attention_mask.all()):  # no padding and no cache: plain causal (SDPA's fast path)
            mask = None
        else:
            mask = attention_mask_4d(attention_mask, T, past_len)
        hidden, presents = self.transformer.encoder(x, cos, sin, mask, past_key_values)
        logits = self.transformer.output_layer(hidden)
        return Glm4Output(logits=logits, past_key_values=presents if use_cache else None)
