"""ChatGLM-6B (THUDM/chatglm-6b): VisualGLM-6B's text model, the same native code without the image encoder
(functions in api.py)."""

from glmtune.models.family import Family
from glmtune.models.visualglm import FAMILY as _VISUALGLM
from glmtune.models.visualglm import is_chatglm6b

FAMILY = Family(
    name="chatglm",
    title="ChatGLM-6B",
    module="glmtune.models.chatglm.api",
    recognizes=lambda config: is_chatglm6b(config) and not config.get("eva_config"),
    components={"language": _VISUALGLM.components["language"]},
    lora_targets={"language": _VISUALGLM.lora_targets["language"]},
    output_layer=_VISUALGLM.output_layer,
    capabilities=frozenset({"ptuning", "packing"}),
    architectures=("ChatGLMModel",),
)
