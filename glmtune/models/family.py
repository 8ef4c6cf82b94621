"""The family contract: what a model family declares and what it provides.

A family is one `Family` object, declared in its own package's `__init__.py` (which imports nothing heavy), and
registered by one line in `glmtune.models.FAMILIES`. The declaration answers, without importing torch, everything
recipe validation and `detect_family` need (name, how its config.json looks, components, capabilities); the
functions live in `Family.module` and are imported on first use: `family.load_model(...)` resolves there.

tests/models/test_family_contract.py checks every registered family against this contract: each member of
`REQUIRED`, and of `BY_CAPABILITY[c]` for each capability it declares, must exist and be callable.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Mapping

# What a family can declare. Recipe validation refuses a recipe that needs a capability its family lacks.
CAPABILITIES = frozenset({
    "vision",  # has an image tower; `blank_image_features` keeps DeepSpeed's module order with text-only batches
    "ptuning",  # adapter.method=ptuning: `add_prefix(model, num_virtual_tokens, projection)`
    "packing",  # data.packing: processor.collate_packed + a model that isolates packed samples
    "moe",  # mixture of experts: router auxiliary loss and ZeRO-3 leaf modules
    "video",  # video samples (frames + timestamps as the official processor lays them out)
    "thinking",  # <think>...</think> answers in the official chat format
    "tools",  # tool calls: a `tools` field and the observation role
    "grounding",  # boxes in the official convention
    "multi_image",  # more than one image per conversation
})

# Functions every family module provides.
REQUIRED = (
    "load_model",  # (path, dtype) -> nn.Module in eval mode, official checkpoint folder, strict
    "build_model",  # (path, meta=False) -> the model config.json describes (meta device: no memory)
    "load_processor",  # (path) -> processor: encode / collate / decode / pad_id / token_count (glmtune.data)
    "generation_eos",  # (model) -> list[int]
    "stream",  # (model, batch, options, eos, pad_id) -> iterator of each step's new tokens (B,)
    "generate",  # (model, batch, max_new_tokens, eos, pad_id) -> new token ids (greedy)
    "make_tiny",  # (out_dir, seed) -> Path: a tiny checkpoint in the official layout
)
# Functions a capability needs.
BY_CAPABILITY = {
    "vision": ("blank_image_features",),  # (model) -> image features of the smallest blank image
    "ptuning": ("add_prefix",),  # (model, num_virtual_tokens, projection) -> prefix module attached
    "packing": (),  # optional `enable_packing(model)` for models that do not isolate packed rows by themselves
    "moe": ("auxiliary_loss", "zero3_leaf_modules"),  # (model, outputs) -> weighted loss | None; (model) -> [classes]
}
OPTIONAL = ("enable_packing", "forward_options")  # forward_options(model) -> extra forward kwargs when training


@dataclass(frozen=True)
class Family:
    name: str  # the recipe's model.family
    title: str  # what users call it, e.g. "GLM-4V-9B"
    module: str  # import path of the functions (torch, transformers are imported there, lazily)
    recognizes: Callable[[dict], bool]  # config.json (parsed) -> whether this family reads the checkpoint
    components: Mapping[str, tuple[str, ...]]  # vision | projector | language -> module-name prefixes (official)
    lora_targets: Mapping[str, tuple[str, ...]]  # component -> module-name leaves adapted by default
    output_layer: str  # the output head (kept in full precision under QLoRA)
    token_embedding: str | None = None  # module whose output image features are written into (vision families)
    capabilities: frozenset[str] = field(default_factory=frozenset)
    architectures: tuple[str, ...] = ()  # config.json "architectures" of the official checkpoints (docs, tiny)

    def __post_init__(self):
        unknown = set(self.capabilities) - CAPABILITIES
        if unknown:
            raise ValueError(f"family {self.name}: unknown capabilities {sorted(unknown)}; known: {sorted(CAPABILITIES)}")
        if ("vision" in self.capabilities) != ("vision" in self.components):
            raise ValueError(f"family {self.name}: the 'vision' capability and a 'vision' component go together")

    def has(self, capability: str) -> bool:
        return capability in self.capabilities

    @property
    def implementation(self):
        return importlib.import_module(self.module)

    def __getattr__(self, name: str):
        # Only plain function names resolve to the module: dunder look-ups (copy, pickle) must not import it.
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return getattr(self.implementation, name)
        except AttributeError:
            raise AttributeError(f"model family {self.name!r} ({self.module}) has no {name!r}") from None

    def provides(self, name: str) -> bool:
        return hasattr(self.implementation, name)

    def missing(self) -> list[str]:
        """Members the contract asks of this family that its module lacks (empty when it conforms)."""
        wanted = list(REQUIRED) + [n for c in sorted(self.capabilities) for n in BY_CAPABILITY.get(c, ())]
        module = self.implementation
        return [n for n in wanted if not callable(getattr(module, n, None))]
