"""VisualGLM-6B's BLIP-2 bridge with the official (SwissArmyTransformer) names under `image_encoder`:
EVA-CLIP ViT-g (`vit`) -> Q-Former with learned queries (`qformer`) -> `glm_proj` to the LM width.

image (B, 3, S, S) -> [cls, patches] (pre-LN ViT, no final norm) -> ln_vision on every token
-> Q-Former: 32 query tokens, cross-attention to the image on the `is_decoder` layers -> (B, 32, Hq)
-> glm_proj -> (B, 32, H). Fused qkv here is [all q | all k | all v] (not per head as in the GLM layers).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def attention(q, k, v, heads: int):
    """Bidirectional multi-head attention on (B, L, C) projections."""
    B, Lq, C = q.shape
    split = lambda x: x.view(B, x.shape[1], heads, C // heads).transpose(1, 2)  # noqa: E731
    y = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return y.transpose(1, 2).reshape(B, Lq, C)


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.dense(attention(*self.query_key_value(x).chunk(3, dim=-1), self.heads))


class CrossAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, encoder_hidden: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key_value = nn.Linear(encoder_hidden, 2 * hidden)  # [all k | all v]
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x, encoder_out):
        k, v = self.key_value(encoder_out).chunk(2, dim=-1)
        return self.dense(attention(self.query(x), k, v, self.heads))


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(hidden, inner)
        self.dense_4h_to_h = nn.Linear(inner, hidden)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))  # exact GELU


class ViTLayer(nn.Module):
    """Pre-LN: x + attn(LN(x)), then + mlp(LN(.))."""

    def __init__(self, c):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layernorm_epsilon)
        self.attention = SelfAttention(c.hidden_size, c.num_attention_heads)
        self.post_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layernorm_epsilon)
        self.mlp = MLP(c.hidden_size, c.inner_hidden_size)

    def forward(self, x):
        x = x + self.attention(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class ViTTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.word_embeddings = nn.Embedding(1, c.hidden_size)  # the cls token, fed as id 0
        self.position_embeddings = nn.Embedding(c.max_sequence_length, c.hidden_size)
        self.layers = nn.ModuleList(ViTLayer(c) for _ in range(c.num_layers))


class PatchEmbedding(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.proj = nn.Conv2d(c.in_channels, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size)


class ClsMixin(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln_vision = nn.LayerNorm(c.hidden_size)  # eps 1e-5, on every token incl. cls


class ViTMixins(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.patch_embedding = PatchEmbedding(c)
        self.cls = ClsMixin(c)


class EVAViT(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.transformer = ViTTransformer(c)
        self.mixins = ViTMixins(c)

    def forward(self, images):
        t = self.transformer
        patches = self.mixins.patch_embedding.proj(images).flatten(2).transpose(1, 2)  # (B, N, C)
        x = torch.cat([t.word_embeddings.weight[None].expand(len(images), -1, -1), patches], dim=1)
        x = x + t.position_embeddings.weight[None, : x.shape[1]]
        for layer in t.layers:
            x = layer(x)
        return self.mixins.cls.ln_vision(x)  # no final transformer LayerNorm


class QFormerLayer(nn.Module):
    """SAT's post-LN BERT layer: a = LN_in(x); m = LN(a + attn(a)); [m = LN(m + cross(m, image))]; x = m + mlp(m)."""

    def __init__(self, c, cross: bool):
        super().__init__()
        eps = c.layernorm_epsilon
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=eps)
        self.attention = SelfAttention(c.hidden_size, c.num_attention_heads)
        self.post_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=eps)
        if cross:
            self.cross_attention = CrossAttention(c.hidden_size, c.num_attention_heads, c.cross_attn_hidden_size)
            self.post_cross_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=eps)
        self.mlp = MLP(c.hidden_size, 4 * c.hidden_size)

    def forward(self, x, image):
        a = self.input_layernorm(x)
        m = self.post_attention_layernorm(a + self.attention(a))
        if hasattr(self, "cross_attention"):
            m = self.post_cross_attention_layernorm(m + self.cross_attention(m, image))
        return m + self.mlp(m)


class QFormerTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)  # the learned queries
        self.layers = nn.ModuleList(QFormerLayer(c, cross) for cross in c.is_decoder[: c.num_layers])
        self.final_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layernorm_epsilon)


class QFormer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.transformer = QFormerTransformer(c)

    def forward(self, image):
        t = self.transformer
        x = t.word_embeddings.weight[None].expand(len(image), -1, -1)  # queries arange(32), no positions
        for layer in t.layers:
            x = layer(x, image)
        return t.final_layernorm(x)


class BLIP2(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.vit = EVAViT(cfg.eva_config)
        self.qformer = QFormer(cfg.qformer_config)
        self.glm_proj = nn.Linear(cfg.qformer_config.hidden_size, cfg.hidden_size)  # 768 -> 4096 at full size

    def forward(self, images):
        return self.glm_proj(self.qformer(self.vit(images)))
