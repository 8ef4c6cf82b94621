"""GLM-4-9B-Chat (THUDM/glm-4-9b-chat): the text model of GLM-4V-9B, the same native code without the vision
tower (functions in api.py)."""

from glmtune.models.family import Family
from glmtune.models.glm4v import FAMILY as _GLM4V
from glmtune.models.glm4v import is_glm4_chatglm

FAMILY = Family(
    name="glm4",
    title="GLM-4-9B-Chat",
    module="glmtune.models.glm4.api",
    recognizes=lambda config: is_glm4_chatglm(config) and not config.get("vision_config"),
    components={"language": _GLM4V.components["language"]},
    lora_targets={"language": _GLM4V.lora_targets["language"]},
    output_layer=_GLM4V.output_layer,
    capabilities=frozenset({"ptuning", "packing"}),
    architectures=("ChatGLMModel",),
)
