"""ChatGLM-6B (and VisualGLM-6B with its BLIP-2 image encoder) in plain PyTorch, official names.

Shapes: B batch, T tokens, H heads, D head dim, C hidden. The numerics follow the official code:
- GLM block with residual alpha sqrt(56) whatever the layer count: h = LN(x)*a + attn(LN(x)),
  out = LN(h)*a + MLP(LN(h)); tanh-approximate GELU; LayerNorm; lm_head tied to the word embeddings.
- qkv grouped per head [q|k|v]; 2D RoPE: the first half of each head rotates by position, the second half
  by block position (rotate-half convention, base 10000, inv_freq rounded to fp16 as the fp16-built
  upstream model has it); scores masked with -10000.
- Prefix-LM attention: keys in the context (block position 0) are visible to every query, causal after.
Positions come from the template as (B, 2, T): [position, block position].

P-tuning v2 (`transformer.prefix_encoder`, `pre_seq_len` / `prefix_projection` in config.json, as upstream): the
prefix enters every layer as the first entries of the KV cache (keys not rotated), every query sees all of it,
and positions, block positions and the attention mask of the caller's tokens are those without a prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.utils import ModelOutput

from glmtune.models.packed_attention import PackedRows, segment_spans, varlen_attention
from glmtune.models.visualglm.config import ChatGLMConfig

ALPHA = math.sqrt(2 * 28)  # upstream's GLMBlock gets num_layers=28 by default, whatever the config says
MASKED = -10000.0


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


class RotaryEmbedding(nn.Module):
    """Holds the checkpoint's `rotary_emb.inv_freq` buffer; the math recomputes it (rounded to fp16)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))


def rope_2d(positions, head_dim: int, dtype):
    """cos/sin (B, 1, T, D/2) for each of the two position kinds; the rotary dim is D/2."""
    dim = head_dim // 2
    inv_freq = (1.0 / (10000 ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))).half().float()
    out = []
    for kind in range(2):
        freqs = positions[:, kind].float()[..., None] * inv_freq  # (B, T, dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, dim)
        out.append((emb.cos().to(dtype), emb.sin().to(dtype)))
    return out


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class SelfAttention(nn.Module):
    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.cfg = cfg
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim // 2)

    def forward(self, x, rope, mask, past=None):
        B, T, C = x.shape
        H, D = self.cfg.num_attention_heads, self.cfg.head_dim
        q, k, v = self.query_key_value(x).view(B, T, H, 3 * D).transpose(1, 2).chunk(3, dim=-1)  # (B, H, T, D)

        def rope2d(t):  # first half by position, second half by block position
            a, b = t.chunk(2, dim=-1)
            return torch.cat([rotate(a, *rope[0]), rotate(b, *rope[1])], dim=-1)

        q, k = rope2d(q), rope2d(k)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if isinstance(mask, PackedRows):  # packed samples: each its own prefix-LM mask, nothing across
            return self.dense(varlen_attention(_masked_segment, q, k, v, mask).reshape(B, T, C)), (k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(y.transpose(1, 2).reshape(B, T, C)), (k, v)


def _masked_segment(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(cfg.inner_hidden_size, cfg.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(gelu_tanh(self.dense_h_to_4h(x)))


class GLMBlock(nn.Module):
    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.attention = SelfAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, past=None):
        a = self.input_layernorm(x)
        attn, present = self.attention(a, rope, mask, past)
        h = a * ALPHA + attn
        m = self.post_attention_layernorm(h)
        return m * ALPHA + self.mlp(m), present


class PrefixEncoder(nn.Module):
    """P-tuning v2 for ChatGLM-6B: per layer, a key and a value (H x D = hidden each) for every virtual token.

    Row p of the table is [layer 0 key | layer 0 value | layer 1 key | ...] of virtual token p (width
    num_layers * 2 * hidden). Without projection the table is `embedding.weight`; with it (upstream's
    prefix_projection) `embedding` is hidden wide and `trans` = Linear(hidden, hidden), Tanh,
    Linear(hidden, width) maps it to the table, as ChatGLM-6B's remote code builds it.
    """

    def __init__(self, cfg: ChatGLMConfig, pre_seq_len: int, projection: bool):
        super().__init__()
        self.cfg, self.pre_seq_len = cfg, pre_seq_len
        width = cfg.num_layers * 2 * cfg.hidden_size
        if projection:
            self.embedding = nn.Embedding(pre_seq_len, cfg.hidden_size)
            self.trans = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.Tanh(),
                                       nn.Linear(cfg.hidden_size, width))
        else:
            self.embedding = nn.Embedding(pre_seq_len, width)

    def forward(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each (B, H, P, D). The submodules are called (not their weights read),
        so DeepSpeed ZeRO-3 gathers them as for any other module."""
        c = self.cfg
        rows = self.embedding(torch.arange(self.pre_seq_len, device=self.embedding.weight.device))
        if hasattr(self, "trans"):
            rows = self.trans(rows)
        kv = rows.view(self.pre_seq_len, 2 * c.num_layers, c.num_attention_heads, c.head_dim).permute(1, 2, 0, 3)
        kv = kv[:, None].expand(-1, batch_size, -1, -1, -1)  # (2L, B, H, P, D)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(c.num_layers)]


class ChatGLMModel(nn.Module):
    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.gradient_checkpointing = False
        if cfg.pre_seq_len:  # a checkpoint with an (exported) P-tuning v2 prefix
            self.prefix_encoder = PrefixEncoder(cfg, cfg.pre_seq_len, cfg.prefix_projection)

    def forward(self, x, rope, mask, past=None):
        presents = []
        for i, layer in enumerate(self.layers):
            layer_past = past[i] if past is not None else None
            if self.gradient_checkpointing and self.training:
                x, present = torch.utils.checkpoint.checkpoint(layer, x, rope, mask, layer_past, use_reentrant=False)
            else:
                x, present = layer(x, rope, mask, layer_past)
            presents.append(present)
        return self.final_layernorm(x), presents


def prefix_lm_mask(attention_mask, block_positions, past_len: int, dtype):
    """Additive (B, 1, Tq, Tk): keys in the context (block position 0) are visible to every query, causal
    after; padding keys masked. Decoding steps (past_len > 0) see every non-padding key, as upstream."""
    B, T = block_positions.shape
    keys = attention_mask[:, : past_len + T].bool()  # (B, Tk)
    if past_len:
        allowed = keys[:, None, None, :].expand(B, 1, T, past_len + T)
    else:
        causal = torch.ones(T, T, dtype=torch.bool, device=keys.device).tril()
        context = (block_positions == 0)[:, None, :]  # (B, 1, Tk)
        allowed = (causal[None] | context) & keys[:, None, :]
        allowed = allowed[:, None]
    zero = torch.zeros((), dtype=dtype, device=keys.device)
    return torch.where(allowed, zero, torch.tensor(MASKED, dtype=dtype, device=keys.device))


def packed_rows(position_ids, dtype) -> PackedRows:
    """Segments of a packed (B, 2, T) batch (positions restart at 0 per sample) with each one's prefix-LM mask,
    exactly the mask that sample gets alone."""
    spans = segment_spans(position_ids[:, 0])
    masks = [[prefix_lm_mask(torch.ones(1, e - s, dtype=torch.long, device=position_ids.device),
                             position_ids[r:r + 1, 1, s:e], 0, dtype) for s, e in row] for r, row in enumerate(spans)]
    return PackedRows(spans, masks)


@dataclass
class ChatGLMOutput(ModelOutput):  # a ModelOutput (a dict) so DeepSpeed ZeRO-3 hooks can see the tensors
    logits: torch.Tensor | None = None
    past_key_values: list | None = None


class ChatGLMForConditionalGeneration(nn.Module):
    """ChatGLM-6B; with `eva_config` in the config, VisualGLM-6B (official `image_encoder` names)."""

    supports_gradient_checkpointing = True

    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.config = cfg
        self.transformer = ChatGLMModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.word_embeddings.weight  # tied, as upstream loading does
        if cfg.eva_config is not None:
            from glmtune.models.visualglm.blip2 import BLIP2

            self.image_encoder = BLIP2(cfg)

    def get_input_embeddings(self):
        return self.transformer.word_embeddings

    def gradient_checkpointing_enable(self, **_):
        self.transformer.gradient_checkpointing = True

    def enable_input_require_grads(self):
        self.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))

    def embed(self, input_ids, images=None, image_mask=None):
        x = self.transformer.word_embeddings(input_ids)
        if images is not None:
            if image_mask is None:
                raise ValueError("images given without image_mask (the image placeholder positions)")
            vision = self.image_encoder(images.to(x.dtype))  # (n_images, image_length, C)
            x = x.masked_scatter(image_mask[..., None].to(x.device), vision.to(x.dtype).reshape(-1, x.shape[-1]))
        return x

    def forward(self, input_ids, position_ids, attention_mask=None, images=None, image_mask=None,
                past_key_values=None, use_cache: bool = False, **_):
        """`attention_mask` (B, past + T) and `position_ids` (B, 2, T) describe the caller's own tokens; with a
        P-tuning prefix the cache starts with it (the prompt step creates it), and every query sees all of it."""
        B, T = input_ids.shape
        x = self.embed(input_ids, images, image_mask)
        prefix = getattr(self.transformer, "prefix_encoder", None)
        n_prefix = prefix.pre_seq_len if prefix is not None else 0
        if prefix is not None and not past_key_values:
            past_key_values = [(k.to(x.dtype), v.to(x.dtype)) for k, v in prefix(B)]
        past_len = (past_key_values[0][0].shape[2] if past_key_values else 0) - n_prefix  # the caller's tokens
        rope = rope_2d(position_ids, self.config.head_dim, x.dtype)
        if attention_mask is None and not past_key_values:  # packed rows (one segment if nothing is packed)
            hidden, presents = self.transformer(x, rope, packed_rows(position_ids, x.dtype), None)
            return ChatGLMOutput(logits=self.lm_head(hidden), past_key_values=presents if use_cache else None)
        if attention_mask is None:
            attention_mask = torch.ones(B, past_len + T, dtype=torch.long, device=input_ids.device)
        mask = prefix_lm_mask(attention_mask, position_ids[:, 1], past_len, x.dtype)  # (B, 1, T, past + T)
        if n_prefix:
            mask = torch.cat([mask.new_zeros(B, 1, T, n_prefix), mask], dim=-1)
        hidden, presents = self.transformer(x, rope, mask, past_key_values)
        return ChatGLMOutput(logits=self.lm_head(hidden), past_key_values=presents if use_cache else None)
