"""GLM-4V-9B (THUDM/glm-4v-9b): native GLM-4 + EVA2-CLIP-E, loaded from the official layout, no remote code
(functions in api.py)."""

from glmtune.models.family import Family


def is_glm4_chatglm(config: dict) -> bool:
    """The GLM-4 generation of the `chatglm` config format (GQA: multi_query_group_num), with or without vision."""
    return config.get("model_type") == "chatglm" and "multi_query_group_num" in config


FAMILY = Family(
    name="glm4v",
    title="GLM-4V-9B",
    module="glmtune.models.glm4v.api",
    recognizes=lambda config: is_glm4_chatglm(config) and bool(config.get("vision_config")),
    # The projector is the conv downsample + GLU adapter (LLaMA-Factory/ms-swift call linear_proj the aligner);
    # the learned boi/eoi vectors are parameters of `transformer.vision` itself and go with the vision tower.
    components={
        "vision": ("transformer.vision",),
        "projector": ("transformer.vision.linear_proj", "transformer.vision.conv"),
        "language": ("transformer.embedding", "transformer.encoder", "transformer.output_layer",
                     "transformer.rotary_pos_emb"),
    },
    lora_targets={
        "vision": ("attention.query_key_value", "attention.dense", "mlp.fc1", "mlp.fc2"),
        "projector": ("linear_proj", "dense_h_to_4h", "gate_proj", "dense_4h_to_h"),
        "language": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    },
    output_layer="transformer.output_layer",  # stays in full precision under QLoRA
    token_embedding="transformer.embedding",
    capabilities=frozenset({"vision", "ptuning", "packing"}),
    architectures=("ChatGLMModel",),
)
