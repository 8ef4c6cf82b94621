"""Native GLM-4 / GLM-4V against the official code's numbers.

- tests/reference/chatglm.cpp-testdata/glm4_model.data: one GLM-4 layer run by the official
  THUDM/glm-4-9b-chat modeling code (chatglm.cpp's test data; layout in LAYOUT.md there).
- tests/golden/glm4v/: a tiny GLM-4V run by the upstream remote code (scripts/make_glm4v_golden.py; SOURCE.md):
  text-only, with an image, left-padded batches and greedy generation with the KV cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from glmtune.models.glm4v.config import config_from_dict
from glmtune.models.glm4v.model import ChatGLMForConditionalGeneration, attention_mask_4d, rope_cos_sin

HERE = Path(__file__).resolve().parent.parent
GOLDEN = HERE / "golden" / "glm4v"
CPP_DATA = HERE / "reference" / "chatglm.cpp-testdata" / "glm4_model.data"

# Bounds from measured noise (scripts/measure_tolerances.py: 1 and 2 threads, AVX-512 and AVX2-only kernels), as
# max |glmtune - upstream|: float summation order differs between CPU kernels, not the math.
# - logits (|logits| <= 4.3), prompt and generation steps: AVX-512 <= 1.4e-6; AVX2 <= 1.35e-5 (the left-padded image
#   batch; the image prompt 8.2e-6, its generation steps 5.2e-6, text <= 1.3e-6). Bound 1e-4 (7x).
LOGITS_ATOL = 1e-4
# - vision tower output and the chatglm.cpp layer's hidden states: <= 2.4e-7 in every setting. Bound 1e-5 (40x).
HIDDEN_ATOL = 1e-5


def test_glm4_layer_matches_official_code():
    raw = dict(model_type="chatglm", hidden_size=32, num_attention_heads=8, num_layers=1, padded_vocab_size=5,
               multi_query_group_num=2, ffn_hidden_size=48, kv_channels=4, layernorm_epsilon=1.5625e-07,
               rope_ratio=500)
    cfg = config_from_dict(raw)
    model = ChatGLMForConditionalGeneration(cfg).eval()
    buf, offset = CPP_DATA.read_bytes(), 0

    def take(shape, dtype=np.float32):
        nonlocal offset
        n = int(np.prod(shape)) * 4
        arr = np.frombuffer(buf[offset:offset + n], dtype=dtype).reshape(shape)
        offset += n
        return torch.from_numpy(arr.copy())

    params = dict(model.transformer.named_parameters())
    layer = "encoder.layers.0."
    order = [("embedding.word_embeddings.weight", (5, 32)), (layer + "input_layernorm.weight", (32,)),
             (layer + "self_attention.query_key_value.weight", (48, 32)),
             (layer + "self_attention.query_key_value.bias", (48,)), (layer + "self_attention.dense.weight", (32, 32)),
             (layer + "post_attention_layernorm.weight", (32,)), (layer + "mlp.dense_h_to_4h.weight", (96, 32)),
             (layer + "mlp.dense_4h_to_h.weight", (32, 48)), ("encoder.final_layernorm.weight", (32,))]
    with torch.no_grad():
        for name, shape in order:
            params[name].copy_(take(shape))
    steps = [(take((3,), np.int32), take((3, 32))), (take((1,), np.int32), take((1, 32))),
             (take((1,), np.int32), take((1, 32)))]
    assert offset == len(buf)

    past, position = None, 0
    with torch.no_grad():
        for ids, expected in steps:
            n = len(ids)
            x = model.embed(ids[None].long())
            cos, sin = rope_cos_sin(torch.arange(position, position + n)[None], cfg, x.dtype)
            mask = None if past is None else attention_mask_4d(torch.ones(1, position + n), n, position)
            hidden, past = model.transformer.encoder(x, cos, sin, mask, past)
            torch.testing.assert_close(hidden[0], expected, rtol=0, atol=HIDDEN_ATOL)
            position += n


@pytest.fixture(scope="module")
def golden():
    from glmtune.models.glm4v.api import load_model

    return load_model(GOLDEN), load_file(str(GOLDEN / "golden.safetensors"))


def expand(ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cfg):
    """Upstream's image expansion: the boi/<|endoftext|>/eoi span becomes boi + patches + eoi; every patch
    takes the position after boi's, eoi and the text after keep their own (what glmtune's template emits)."""
    n = cfg.vision_config.num_patches
    rows = []
    for r in range(ids.shape[0]):
        i = ids[r].tolist().index(cfg.boi_token_id)
        rows.append((
            torch.cat([ids[r, :i + 1], ids[r, i + 1].repeat(n), ids[r, i + 2:]]),
            torch.cat([positions[r, :i + 1], positions[r, i + 1].repeat(n), positions[r, i + 2:]]),
            torch.cat([mask[r, :i + 1], mask[r, i + 1].repeat(n), mask[r, i + 2:]]),
            torch.cat([torch.zeros(i, dtype=torch.bool), torch.ones(n + 2, dtype=torch.bool),
                       torch.zeros(ids.shape[1] - i - 3, dtype=torch.bool)]),
        ))
    return [torch.stack(col) for col in zip(*rows)]


def test_text_logits_match_upstream(golden):
    model, g = golden
    with torch.no_grad():
        out = model(input_ids=g["text.input_ids"], position_ids=g["text.position_ids"],
                    attention_mask=g["text.attention_mask"])
    torch.testing.assert_close(out.logits, g["text.logits"], rtol=0, atol=LOGITS_ATOL)


def test_image_logits_positions_and_vision_match_upstream(golden):
    model, g = golden
    ids, pos, mask, image_mask = expand(g["image.input_ids"], g["image.position_ids"], g["image.attention_mask"],
                                        model.config)
    assert pos.tolist() == g["image.used_position_ids"].tolist()  # all patches share one position id
    with torch.no_grad():
        vision = model.transformer.vision(g["image.images"])
        out = model(input_ids=ids, position_ids=pos, attention_mask=mask, images=g["image.images"],
                    image_mask=image_mask)
    torch.testing.assert_close(vision, g["image.vision_out"], rtol=0, atol=HIDDEN_ATOL)
    torch.testing.assert_close(out.logits, g["image.logits"], rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("case", ["text_batch", "image_batch"])
def test_left_padded_batches_match_upstream(golden, case):
    model, g = golden
    ids, pos, mask = g[f"{case}.input_ids"], g[f"{case}.position_ids"], g[f"{case}.attention_mask"]
    kwargs = {}
    if case == "image_batch":
        ids, pos, mask, image_mask = expand(ids, pos, mask, model.config)
        assert mask.tolist() == g["image_batch.attention_mask_expanded"].tolist()
        kwargs = {"images": g["image_batch.images"], "image_mask": image_mask}
    assert pos.tolist() == g[f"{case}.used_position_ids"].tolist()
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=pos, attention_mask=mask, **kwargs).logits
    real = mask.bool()  # upstream's logits at padding positions are garbage by design
    torch.testing.assert_close(logits[real], g[f"{case}.logits"][real], rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("case", ["text", "image", "image_batch"])
def test_greedy_generation_with_kv_cache_matches_upstream(golden, case, trace_generate):
    from glmtune.models.glm4v.api import generate

    model, g = golden
    ids, pos, mask = g[f"{case}.input_ids"], g[f"{case}.position_ids"], g[f"{case}.attention_mask"]
    batch = {"input_ids": ids, "position_ids": pos, "attention_mask": mask}
    if case != "text":
        ids, pos, mask, image_mask = expand(ids, pos, mask, model.config)
        batch = {"input_ids": ids, "position_ids": pos, "attention_mask": mask, "images": g[f"{case}.images"],
                 "image_mask": image_mask}
    new, steps = trace_generate(generate, model, batch)
    assert new.tolist() == g[f"{case}.gen_ids"].tolist()  # greedy tokens stay exact
    # decoding counts on in the unexpanded prompt while the cache holds the expanded one, as upstream
    assert steps["position_ids"].tolist() == g[f"{case}.gen_step_position_ids"].tolist()
    assert steps["past_len"] == g[f"{case}.gen_step_past_len"].tolist()
    torch.testing.assert_close(steps["logits"], g[f"{case}.gen_logits"], rtol=0, atol=LOGITS_ATOL)
