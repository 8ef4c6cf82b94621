"""GLM-4.1V through transformers' own `Glm4vForConditionalGeneration` (functions in api.py).

Official parameter names (model.safetensors.index.json of zai-org/GLM-4.1V-9B-Thinking) are the module names of
transformers' class, so PEFT adapter keys and merged shards use them unchanged.
"""

from glmtune.models.family import Family

FAMILY = Family(
    name="glm41v",
    title="GLM-4.1V-9B",
    module="glmtune.models.glm41v.api",
    recognizes=lambda config: config.get("model_type") == "glm4v",
    # Component -> module-name prefixes (official names). A parameter belongs to the longest matching prefix.
    components={
        "vision": ("model.visual",),
        "projector": ("model.visual.merger",),
        "language": ("model.language_model", "lm_head"),
    },
    # Default LoRA targets inside each component, as LLaMA-Factory/ms-swift "all-linear".
    lora_targets={
        "vision": ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        "projector": ("proj", "gate_proj", "up_proj", "down_proj"),
        "language": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"),
    },
    output_layer="lm_head",  # stays in full precision under QLoRA (as transformers' bitsandbytes integration does)
    token_embedding="model.language_model.embed_tokens",
    capabilities=frozenset({"vision", "packing", "multi_image"}),
    architectures=("Glm4vForConditionalGeneration",),
)
