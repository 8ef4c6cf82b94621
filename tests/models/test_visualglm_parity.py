"""Native ChatGLM-6B / VisualGLM-6B against the official code's numbers.

- tests/reference/chatglm.cpp-testdata/glm_model.data: one ChatGLM-6B layer run by the official
  THUDM/chatglm-6b modeling code (chatglm.cpp's test data; layout in LAYOUT.md there).
- tests/golden/visualglm/: a tiny VisualGLM-6B run by the upstream remote code + SwissArmyTransformer 0.3.6
  (scripts/make_visualglm_golden.py; SOURCE.md): text, left-padded batch, image (ViT, Q-Former, projection,
  logits) and greedy generation with the KV cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from glmtune.models.visualglm.config import config_from_dict
from glmtune.models.visualglm.model import ChatGLMForConditionalGeneration, prefix_lm_mask, rope_2d

HERE = Path(__file__).resolve().parent.parent
GOLDEN = HERE / "golden" / "visualglm"
CPP_DATA = HERE / "reference" / "chatglm.cpp-testdata" / "glm_model.data"

# Bounds from measured noise (scripts/measure_tolerances.py: 1 and 2 threads, AVX-512 and AVX2-only kernels), as
# max |glmtune - upstream|: float summation order differs between CPU kernels, not the math.
# - logits (|logits| <= 4.3; here and in test_visualglm_ptuning_parity.py) of prompts and generation steps, and the
#   image path's stages (ViT, Q-Former, projection; |x| <= 4): <= 2.4e-6 in every setting (AVX2 moves them by
#   < 3e-7). Bound 2e-5 (8x), tighter than GLM-4V's 1e-4 on purpose: RoPE's inv_freq in exact fp32 instead of
#   upstream's fp16-rounded one moves these logits by 1.3e-4 (image: 4.5e-4), which a 1e-4 bound would let pass.
ATOL = 2e-5
# - the chatglm.cpp layer's hidden states: <= 1.8e-7 in every setting. Bound 1e-5 (55x).
LAYER_ATOL = 1e-5


def test_chatglm6b_layer_matches_official_code():
    cfg = config_from_dict(dict(model_type="chatglm", hidden_size=32, num_attention_heads=8, num_layers=1,
                                vocab_size=5, inner_hidden_size=128, layernorm_epsilon=1e-5,
                                position_encoding_2d=True))
    model = ChatGLMForConditionalGeneration(cfg).eval()
    buf, offset = CPP_DATA.read_bytes(), 0

    def take(shape, dtype=np.float32):
        nonlocal offset
        n = int(np.prod(shape)) * 4
        arr = np.frombuffer(buf[offset:offset + n], dtype=dtype).reshape(shape)
        offset += n
        return torch.from_numpy(arr.copy())

    params = dict(model.transformer.named_parameters())
    layer = "layers.0."
    order = [("word_embeddings.weight", (5, 32))]
    for name, shape in (("input_layernorm", (32,)), ("attention.query_key_value", (96, 32)),
                        ("attention.dense", (32, 32)), ("post_attention_layernorm", (32,)),
                        ("mlp.dense_h_to_4h", (128, 32)), ("mlp.dense_4h_to_h", (32, 128))):
        order += [(f"{layer}{name}.weight", shape), (f"{layer}{name}.bias", (shape[0],))]
    order += [("final_layernorm.weight", (32,)), ("final_layernorm.bias", (32,))]
    with torch.no_grad():
        for name, shape in order:
            params[name].copy_(take(shape))
    x1, y1, x2, y2, x3, y3 = (take((3,), np.int32), take((3, 32)), take((1,), np.int32), take((1, 32)),
                              take((1,), np.int32), take((1, 32)))
    assert offset == len(buf)

    # the official call: positions [[0,1,1],[0,0,1]] (prefix-LM over the first two), then decode steps
    steps = [(x1, [[0, 1, 1], [0, 0, 1]], y1), (x2, [[1], [2]], y2), (x3, [[1], [3]], y3)]
    past, seen = None, 0
    with torch.no_grad():
        for ids, positions, expected in steps:
            pos = torch.tensor([positions])
            x = model.embed(ids[None].long())
            mask = prefix_lm_mask(torch.ones(1, seen + len(ids)), pos[:, 1], seen, x.dtype)
            hidden, past = model.transformer(x, rope_2d(pos, cfg.head_dim, x.dtype), mask, past)
            torch.testing.assert_close(hidden[0], expected, rtol=0, atol=LAYER_ATOL)
            seen += len(ids)


@pytest.fixture(scope="module")
def golden():
    from glmtune.models.visualglm.api import load_model

    return load_model(GOLDEN), load_file(str(GOLDEN / "golden.safetensors"))


def image_mask(g, case: str) -> torch.Tensor:
    ids = g[f"{case}.input_ids"]
    pre = int(g["image.pre_image_length"])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, pre:pre + 32] = True
    return mask


def test_text_logits_match_upstream(golden):
    model, g = golden
    with torch.no_grad():
        logits = model(input_ids=g["text.input_ids"], position_ids=g["text.position_ids"]).logits
    torch.testing.assert_close(logits, g["text.logits"], rtol=0, atol=ATOL)


def test_left_padded_batch_matches_upstream(golden):
    model, g = golden
    mask = g["text_batch.attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=g["text_batch.input_ids"], position_ids=g["text_batch.position_ids"],
                       attention_mask=mask).logits
    real = mask.bool()  # upstream's logits at padding positions are garbage by design
    torch.testing.assert_close(logits[real], g["text_batch.logits"][real], rtol=0, atol=ATOL)


def test_image_path_matches_upstream_stage_by_stage(golden):
    model, g = golden
    enc = model.image_encoder
    with torch.no_grad():
        vit = enc.vit(g["image.images"])
        qformer = enc.qformer(vit)
        embeds = enc(g["image.images"])
        logits = model(input_ids=g["image.input_ids"], position_ids=g["image.position_ids"],
                       images=g["image.images"], image_mask=image_mask(g, "image")).logits
        batch_logits = model(input_ids=g["image_batch.input_ids"],
                             position_ids=g["image.position_ids"].expand(2, -1, -1),
                             images=g["image_batch.images"], image_mask=image_mask(g, "image_batch")).logits
    torch.testing.assert_close(vit, g["image.vit_out"], rtol=0, atol=ATOL)
    torch.testing.assert_close(qformer, g["image.qformer_out"], rtol=0, atol=ATOL)
    torch.testing.assert_close(embeds, g["image.image_embeds"], rtol=0, atol=ATOL)
    torch.testing.assert_close(logits, g["image.logits"], rtol=0, atol=ATOL)
    torch.testing.assert_close(batch_logits, g["image_batch.logits"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", ["text", "image"])
def test_greedy_generation_with_kv_cache_matches_upstream(golden, case, trace_generate):
    from glmtune.models.visualglm.api import generate

    model, g = golden
    batch = {"input_ids": g[f"{case}.input_ids"], "position_ids": g[f"{case}.position_ids"],
             "attention_mask": torch.ones_like(g[f"{case}.input_ids"])}
    if case == "image":
        batch.update(images=g["image.images"], image_mask=image_mask(g, "image"))
    new, steps = trace_generate(generate, model, batch)
    assert new.tolist() == g[f"{case}.gen_ids"].tolist()  # greedy tokens stay exact
    # new tokens keep the [gMASK] position, the block position counts on
    assert steps["position_ids"].tolist() == g[f"{case}.gen_step_position_ids"].tolist()
    assert steps["past_len"] == g[f"{case}.gen_step_past_len"].tolist()
    torch.testing.assert_close(steps["logits"], g[f"{case}.gen_logits"], rtol=0, atol=ATOL)
