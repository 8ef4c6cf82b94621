"""EVA2-CLIP-E vision tower of GLM-4V-9B with its 2x2 conv downsample and GLU adapter (official names).

image (B, 3, S, S) -> patches (B, (S/p)^2, Cv) + cls -> post-norm ViT -> drop cls -> conv 2x2 stride 2
-> GLU adapter to the LM width -> [boi, patches, eoi] / scaling_factor: (B, 2 + (S/p/2)^2, C).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchEmbedding(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.proj = nn.Conv2d(v.in_channels, v.hidden_size, kernel_size=v.patch_size, stride=v.patch_size)
        self.cls_embedding = nn.Parameter(torch.zeros(1, v.hidden_size))
        self.position_embedding = nn.Embedding(v.num_positions, v.hidden_size)

    def forward(self, images):
        x = self.proj(images).flatten(2).transpose(1, 2)  # (B, N, Cv)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position_embedding.weight[None, : x.shape[1]]


class Attention(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.num_heads = v.num_heads
        self.query_key_value = nn.Linear(v.hidden_size, 3 * v.hidden_size)  # [all q | all k | all v]
        self.dense = nn.Linear(v.hidden_size, v.hidden_size)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.query_key_value(x).view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # bidirectional
        return self.dense(y.transpose(1, 2).reshape(B, L, C))


class MLP(nn.Module):
    def __init__(self, v):
        super().__init__()
        if v.hidden_act != "gelu":
            raise ValueError(f"vision_config.hidden_act={v.hidden_act!r}: only 'gelu' (exact) is implemented")
        self.fc1 = nn.Linear(v.hidden_size, v.intermediate_size)
        self.fc2 = nn.Linear(v.intermediate_size, v.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerLayer(nn.Module):
    """Post-sublayer norm: x + LN(attn(x)), then + LN(mlp(.))."""

    def __init__(self, v):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.attention = Attention(v)
        self.mlp = MLP(v)
        self.post_attention_layernorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)

    def forward(self, x):
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class Transformer(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(v) for _ in range(v.num_hidden_layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class GLU(nn.Module):
    """Adapter to the LM: linear -> LayerNorm (eps 1e-5, not the vision eps) -> GELU -> SwiGLU of LM FFN width."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, in_features: int):
        super().__init__()
        self.linear_proj = nn.Linear(in_features, hidden_size, bias=False)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.dense_h_to_4h = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x):
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        v = cfg.vision_config
        self.patch_embedding = PatchEmbedding(v)
        self.transformer = Transformer(v)
        self.linear_proj = GLU(cfg.hidden_size, cfg.ffn_hidden_size, in_features=cfg.hidden_size)
        self.conv = nn.Conv2d(v.hidden_size, cfg.hidden_size, kernel_size=2, stride=2)
        self.boi = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.scaling_factor = v.scaling_factor

    def forward(self, images):
        x = self.transformer(self.patch_embedding(images))[:, 1:]  # drop cls: (B, N, Cv)
        B, N, C = x.shape
        side = int(N**0.5)
        x = self.conv(x.view(B, side, side, C).permute(0, 3, 1, 2))  # (B, C_lm, side/2, side/2)
        x = self.linear_proj(x.flatten(2).transpose(1, 2))
        x = torch.cat([self.boi.expand(B, -1, -1), x, self.eoi.expand(B, -1, -1)], dim=1)
        return x / self.scaling_factor
