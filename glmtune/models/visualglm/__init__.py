"""VisualGLM-6B (THUDM/visualglm-6b): native ChatGLM-6B + BLIP-2 (EVA-CLIP + Q-Former), official `.bin` layout
(functions in api.py)."""

from glmtune.models.family import Family


def is_chatglm6b(config: dict) -> bool:
    """The 2023 ChatGLM-6B generation of the `chatglm` config format (2-D positions)."""
    return config.get("model_type") == "chatglm" and bool(config.get("position_encoding_2d"))


FAMILY = Family(
    name="visualglm",
    title="VisualGLM-6B",
    module="glmtune.models.visualglm.api",
    recognizes=lambda config: is_chatglm6b(config) and bool(config.get("eva_config")),
    # The Q-Former and glm_proj bridge the image into the LM: they are the projector.
    components={
        "vision": ("image_encoder",),
        "projector": ("image_encoder.qformer", "image_encoder.glm_proj"),
        "language": ("transformer", "lm_head"),
    },
    # Upstream (SwissArmyTransformer LoraMixin, finetune_visualglm.py): LoRA on query_key_value and dense.
    lora_targets={
        "vision": ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        "projector": ("query_key_value", "dense", "query", "key_value", "dense_h_to_4h", "dense_4h_to_h"),
        "language": ("query_key_value", "dense"),
    },
    output_layer="lm_head",  # tied to the word embeddings; stays in full precision under QLoRA
    token_embedding="transformer.word_embeddings",
    capabilities=frozenset({"vision", "ptuning", "packing"}),
    architectures=("ChatGLMModel",),
)
