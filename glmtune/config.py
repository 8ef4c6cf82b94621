"""Recipe YAML -> typed dataclasses.

A recipe is an OmegaConf YAML file plus `key=value` dotlist overrides. Every key is declared below;
an unknown or mistyped key, a wrong type, a bad choice or a missing file stops before any work with
a `RecipeError` naming the key, the file and the closest valid key.
"""

from __future__ import annotations

import difflib
import os
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from glmtune.errors import CheckpointError, NonFiniteError, RecipeError  # noqa: F401  (re-exported)

COMPONENTS = ("vision", "projector", "language")
COMPONENT_MODES = ("frozen", "lora", "full")


@dataclass
class ModelConfig:
    family: str = MISSING  # a key of glmtune.models.FAMILIES
    path: str = MISSING  # folder in the official Hugging Face layout
    dtype: str = "float32"  # float32 | bfloat16 | float16: dtype of the frozen base weights
    gradient_checkpointing: bool = False


@dataclass
class AdapterConfig:
    method: str = "lora"  # lora | dora | qlora | ptuning | none
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r (PEFT use_rslora)
    # qlora: the vision tower stays in full precision unless asked (its quantization error is large)
    quantize_vision: bool = False
    # ptuning (P-tuning v2): learned keys/values of this many virtual tokens in every language-model layer
    num_virtual_tokens: int = 16
    prefix_projection: bool = False  # reparameterise the prefix through a 2-layer MLP while training
    # module-name suffixes to adapt inside the components set to `lora`; empty = the family's default
    target: list[str] = field(default_factory=list)
    # language-model layer indices that get LoRA (upstream VisualGLM's --layer_range: a list, e.g. [0, 14]);
    # empty = every layer
    layers: list[int] = field(default_factory=list)
    components: dict[str, str] = field(
        default_factory=lambda: {"vision": "frozen", "projector": "frozen", "language": "lora"}
    )


@dataclass
class DataConfig:
    train: str = MISSING  # data file (.jsonl or .json); image paths are relative to it
    val: Optional[str] = None
    # folder that relative image paths are resolved against; empty = each data file's own folder
    # (upstream VisualGLM/GLM-4 scripts resolve against the working directory: set image_dir=. for their data)
    image_dir: Optional[str] = None
    format: str = "auto"  # auto | glm4 | visualglm | llava | sharegpt
    max_length: int = 1024  # tokens incl. image tokens; longer samples are never cut inside an image
    on_bad_sample: str = "error"  # error | skip (skipped samples are counted in summary.json)
    # before step 1 the first `check_first` records of data.train (and data.val) are read and encoded: no record,
    # no good one, or more than `max_bad_fraction` of them bad stops the run with one line naming the file
    check_first: int = 100
    max_bad_fraction: float = 0.5
    max_image_pixels: int = 64_000_000  # decompression-bomb limit: larger images (from their header) are bad samples
    shuffle_buffer: int = 256  # 0 or 1 = keep file order
    num_workers: int = 1  # DataLoader workers that decode images
    max_eval_samples: int = 200  # cap for the periodic eval loss and final metrics
    # several samples share a row of up to max_length tokens, each attending only to itself (positions restart
    # per sample); each micro-batch's samples go into as few rows as possible
    packing: bool = False
    # > 0: a micro-batch holds as many consecutive records as fit in this many tokens (incl. image tokens; at
    # least one record) instead of train.batch_size records, so memory per step stays flat; >= max_length
    batch_tokens: int = 0


@dataclass
class TrainConfig:
    output_dir: str = "runs/glmtune"
    max_steps: int = 100  # optimizer steps
    batch_size: int = 2  # per device, per micro-step
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float = 1.0
    # inf/nan loss or gradient norm: error (stop, naming the step and the last good checkpoint) | skip_step
    # (drop that update, count it in summary.json; not under DeepSpeed, whose engine steps inside backward)
    on_nonfinite: str = "error"
    seed: int = 0
    save_every: int = 0  # 0 = only the final checkpoint
    eval_every: int = 0  # 0 = only at the end (when data.val is set)
    keep_last: int = 2  # numbered checkpoints kept; checkpoint-final is never deleted
    resume: str = "auto"  # auto | never | PATH to a checkpoint-STEP folder
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate autocast)
    # several processes: auto (= ddp) | ddp | zero2 | zero3 | zero3_offload (DeepSpeed, configs/deepspeed/*.json)
    distributed: str = "auto"
    deepspeed: Optional[str] = None  # a DeepSpeed config json of your own ("auto" values are filled from the recipe)


@dataclass
class LogConfig:
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])  # jsonl | wandb | tensorboard
    run_name: Optional[str] = None
    log_every: int = 1
    progress_bar: bool = True


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "adapter.method": ("lora", "dora", "qlora", "ptuning", "none"),
    "data.format": ("auto", "glm4", "visualglm", "llava", "sharegpt"),
    "data.on_bad_sample": ("error", "skip"),
    "train.lr_scheduler": ("cosine", "linear", "constant"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.distributed": ("auto", "ddp", "zero2", "zero3", "zero3_offload"),
    "train.on_nonfinite": ("error", "skip_step"),
}
REPORT_TO = ("jsonl", "wandb", "tensorboard")
LORA_METHODS = ("lora", "dora", "qlora")  # methods that put LoRA matrices on the `lora` components


def _all_keys(cls, prefix="") -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            out += _all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


VALID_KEYS = _all_keys(Recipe)


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, VALID_KEYS, n=1, cutoff=0.5)
    if not close:  # a misspelled section: match on the last part only
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in VALID_KEYS if k.endswith("." + leaf)][:1]
    return f"; did you mean `{close[0]}`?" if close else f"; valid keys: {', '.join(VALID_KEYS)}"


def _check_keys(node: Any, prefix: str, where: str) -> None:
    """Unknown keys, with the closest valid one. `components` is a free dict checked later."""
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        full = f"{prefix}{key}"
        if full == "adapter.components":
            continue
        if full not in VALID_KEYS and not any(k.startswith(full + ".") for k in VALID_KEYS):
            leaf = full
            while isinstance(value, dict) and value:  # suggest on the whole dotted key, e.g. trian.max_steps
                key, value = next(iter(value.items()))
                leaf = f"{leaf}.{key}"
            raise RecipeError(f"{where}: unknown recipe key `{leaf}`{_suggest(leaf)}")
        if isinstance(value, dict):
            if full in VALID_KEYS:
                raise RecipeError(f"{where}: `{full}` takes a single value, not a mapping")
            _check_keys(value, full + ".", where)
        elif any(k.startswith(full + ".") for k in VALID_KEYS):
            raise RecipeError(f"{where}: `{full}` is a section; set its keys, e.g. `{full}.{_first_child(full)}=...`")


def _first_child(section: str) -> str:
    return next(k for k in VALID_KEYS if k.startswith(section + ".")).split(".")[-1]


def load_recipe(path: str | os.PathLike | None, overrides: list[str] = (), check_files: bool = True) -> Recipe:
    """Read a recipe file, apply `key=value` overrides, validate everything; return a typed Recipe."""
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        except Exception as e:  # yaml.YAMLError and friends carry the line number in their text
            raise RecipeError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise RecipeError(f"{path}: a recipe must be a mapping of sections (model:, data:, train:, ...)")
        _check_keys(raw, "", str(path))
        layers.append((str(path), raw))
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override `{item}` must look like key=value, e.g. train.max_steps=10")
        key, _ = item.split("=", 1)
        try:
            raw = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise RecipeError(f"override `{item}`: {e}") from None
        _check_keys(raw, "", f"override `{item}`")
        layers.append((f"override `{item}`", raw))

    cfg = OmegaConf.structured(Recipe)
    for where, raw in layers:
        try:
            cfg = OmegaConf.merge(cfg, raw)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            msg = str(getattr(e, "msg", e)).splitlines()[0]
            raise RecipeError(f"{where}: bad value for `{key}`: {msg}") from None
    missing = sorted(k for k in VALID_KEYS if OmegaConf.is_missing(cfg[k.split(".")[0]], k.split(".", 1)[1]))
    if missing:
        src = path if path is not None else "the command line"
        raise RecipeError(f"{src}: required key `{missing[0]}` is not set "
                          f"(add it to the recipe or pass {missing[0]}=...)")
    recipe: Recipe = OmegaConf.to_object(cfg)
    where = str(path) if path else "recipe"
    validate(recipe, f"{where} with overrides {list(overrides)}" if overrides else where, check_files=check_files)
    return recipe


def validate(recipe: Recipe, where: str, check_files: bool = True) -> None:
    from glmtune.models import FAMILIES, families_with

    def fail(key: str, msg: str):
        raise RecipeError(f"{where}: `{key}` {msg}")

    if recipe.model.family not in FAMILIES:
        close = difflib.get_close_matches(recipe.model.family, list(FAMILIES), n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        fail("model.family", f"is {recipe.model.family!r}, must be one of {sorted(FAMILIES)}{hint}")
    if recipe.train.mixed_precision in ("False", "false"):  # YAML reads a bare `no` as the boolean false
        recipe.train.mixed_precision = "no"
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            fail(key, f"is {value!r}, must be one of {list(choices)}{hint}")
    for item in recipe.log.report_to:
        if item not in REPORT_TO:
            fail("log.report_to", f"has {item!r}, items must be among {list(REPORT_TO)}")
    comps = recipe.adapter.components
    for name, mode in comps.items():
        if name not in COMPONENTS:
            close = difflib.get_close_matches(name, COMPONENTS, n=1)
            hint = f"; did you mean `adapter.components.{close[0]}`?" if close else ""
            fail(f"adapter.components.{name}", f"is not a component; components are {list(COMPONENTS)}{hint}")
        if mode not in COMPONENT_MODES:
            fail(f"adapter.components.{name}", f"is {mode!r}, must be one of {list(COMPONENT_MODES)}")
    for name in COMPONENTS:
        comps.setdefault(name, "frozen")
    family, own = recipe.model.family, FAMILIES[recipe.model.family].components
    for name, mode in comps.items():
        if name not in own and mode != "frozen":
            fail(f"adapter.components.{name}", f"is `{mode}` but {family} is a text model without a {name} "
                                               f"(its only component is the language model); set it to frozen")
    if recipe.adapter.method == "ptuning" and not FAMILIES[family].has("ptuning"):
        fail("adapter.method", f"is `ptuning`, which is not implemented for {family} yet (available for: "
                               f"{', '.join(families_with('ptuning'))}); use lora, dora or qlora")
    if recipe.adapter.method in ("none", "ptuning") and "lora" in comps.values():
        lora_key = next(f"adapter.components.{c}" for c, m in comps.items() if m == "lora")
        fail(lora_key, f"is `lora` but adapter.method is `{recipe.adapter.method}`"
                    + (" (P-tuning v2 learns prefix keys/values of the language model's attention only)"
                       if recipe.adapter.method == "ptuning" else "")
                    + "; set adapter.method=lora or make the component full/frozen")
    if recipe.adapter.method in LORA_METHODS and "lora" not in comps.values():
        fail("adapter.components", f"has no component set to `lora` although adapter.method is "
                                   f"`{recipe.adapter.method}`")
    lora_comps = [c for c, m in comps.items() if m == "lora"]
    if recipe.adapter.method == "qlora" and set(lora_comps) == {"vision"} and not recipe.adapter.quantize_vision:
        fail("adapter.quantize_vision", "is false and the vision tower is the only `lora` component, so "
                                        "adapter.method=qlora would quantize nothing; set adapter.quantize_vision="
                                        "true, or use adapter.method=lora")
    if recipe.adapter.layers and comps["language"] != "lora":
        fail("adapter.layers", f"is {list(recipe.adapter.layers)}: it picks language-model layers for LoRA, but "
                               f"adapter.components.language is `{comps['language']}`; set it to lora or "
                               f"adapter.layers=[]")
    if recipe.adapter.method == "qlora" and recipe.train.distributed in ("zero3", "zero3_offload"):
        fail("train.distributed", f"is `{recipe.train.distributed}` but adapter.method is `qlora`: ZeRO-3 cannot "
                                  f"partition the 4-bit base weights; use zero2 or ddp (the 4-bit base is what "
                                  f"makes the model fit)")
    if recipe.data.packing and not FAMILIES[family].has("packing"):
        fail("data.packing", f"is true but family `{family}` does not support packing yet (supported: "
                             f"{', '.join(families_with('packing'))}); set data.packing=false")
    if recipe.data.batch_tokens and recipe.data.batch_tokens < recipe.data.max_length:
        fail("data.batch_tokens", f"is {recipe.data.batch_tokens}, smaller than data.max_length="
                                  f"{recipe.data.max_length}: a full-length sample would not fit; use 0 (off) or "
                                  f"a value >= data.max_length")
    if recipe.data.packing and recipe.adapter.method == "ptuning":
        fail("data.packing", "is true with adapter.method=ptuning: the learned prefix would be shared by every "
                             "sample of a row; set data.packing=false")
    if recipe.train.on_nonfinite == "skip_step" and (recipe.train.distributed.startswith("zero")
                                                     or recipe.train.deepspeed is not None):
        fail("train.on_nonfinite", "is `skip_step`, which DeepSpeed cannot do (its engine applies the update "
                                   "inside backward, before the loss is known); use `error` under DeepSpeed")
    if "lora" not in comps.values() and "full" not in comps.values() and recipe.adapter.method != "ptuning":
        fail("adapter.components", "leaves every component frozen: nothing would train")
    positive = {"adapter.r": recipe.adapter.r, "adapter.num_virtual_tokens": recipe.adapter.num_virtual_tokens,
                "train.max_steps": recipe.train.max_steps,
                "train.batch_size": recipe.train.batch_size, "train.grad_accum": recipe.train.grad_accum,
                "data.max_length": recipe.data.max_length, "log.log_every": recipe.log.log_every,
                "data.check_first": recipe.data.check_first, "data.max_image_pixels": recipe.data.max_image_pixels}
    for key, value in positive.items():
        if value < 1:
            fail(key, f"is {value}, must be >= 1")
    for key, value in {"train.save_every": recipe.train.save_every, "train.eval_every": recipe.train.eval_every,
                       "train.keep_last": recipe.train.keep_last, "data.num_workers": recipe.data.num_workers,
                       "data.shuffle_buffer": recipe.data.shuffle_buffer, "data.batch_tokens": recipe.data.batch_tokens,
                       "data.max_eval_samples": recipe.data.max_eval_samples,
                       "adapter.dropout": recipe.adapter.dropout, "train.lr": recipe.train.lr}.items():
        if value < 0:
            fail(key, f"is {value}, must be >= 0")
    for key in ("train", "val"):
        value = getattr(recipe.data, key)
        if value is not None and Path(value).suffix.lower() not in (".jsonl", ".json"):
            fail(f"data.{key}", f"= {value}: a data file must be .jsonl (one JSON object per line) or .json "
                                f"(an array of objects)")
    if not 0 <= recipe.data.max_bad_fraction <= 1:
        fail("data.max_bad_fraction", f"is {recipe.data.max_bad_fraction}, must be in [0, 1] (1 = only an all-bad "
                                      f"start stops the run)")
    if not 0 <= recipe.train.warmup_ratio < 1:
        fail("train.warmup_ratio", f"is {recipe.train.warmup_ratio}, must be in [0, 1)")
    if recipe.train.resume not in ("auto", "never") and not Path(recipe.train.resume).is_dir():
        fail("train.resume", f"is {recipe.train.resume!r}: neither auto/never nor an existing checkpoint folder")
    if check_files:
        model_dir = Path(recipe.model.path)
        if not (model_dir / "config.json").is_file():
            fail("model.path", f"= {model_dir} has no config.json; point it at a checkpoint folder in the official "
                 f"Hugging Face layout (or create a tiny one: glmtune make-tiny {recipe.model.family} {model_dir})")
        if recipe.train.deepspeed is not None and not Path(recipe.train.deepspeed).is_file():
            fail("train.deepspeed", f"= {recipe.train.deepspeed}: file not found")
        if recipe.data.image_dir is not None and not Path(recipe.data.image_dir).is_dir():
            fail("data.image_dir", f"= {recipe.data.image_dir}: folder not found")
        for key in ("train", "val"):
            value = getattr(recipe.data, key)
            if value is not None and not Path(value).is_file():
                fail(f"data.{key}", f"= {value}: file not found")


def to_dict(recipe: Recipe) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(recipe))


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    OmegaConf.save(OmegaConf.structured(recipe), path)
