"""Every family x adapter method x component modes (vision / projector / language, each frozen | lora | full).

What recipe validation (the check `glmtune check` and `glmtune train` run first) accepts must work: the adapter
attaches, one forward + backward on one tiny sample gives gradients to exactly the declared parameters (frozen:
none; full: every parameter of the component; lora: only LoRA weights inside it), and the trained state, saved and
loaded into a fresh base, gives the trained model's logits. What validation rejects fails with a one-line error
naming the recipe key, before any model is loaded. The accepted combinations are counted, so that a validation
that rejected too much would fail here too.
"""

from __future__ import annotations

import copy
import itertools
import re
from pathlib import Path

import pytest
import torch
import yaml

from glmtune.config import LORA_METHODS, RecipeError, load_recipe, validate
from glmtune.data.sample import Turn

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = {"glm41v": "tiny_glm41v", "glm4v": "tiny_glm4v", "glm4": "tiny_glm4", "visualglm": "tiny_visualglm",
            "chatglm": "tiny_chatglm"}
METHODS = ("lora", "dora", "qlora", "ptuning", "none")
MODES = ("frozen", "lora", "full")
COMPONENTS = ("vision", "projector", "language")
PREFIX = "transformer.prefix_encoder."
_BASE_RECIPE = load_recipe(None, ["model.family=glm4v", "model.path=/none", "data.train=/none.jsonl"],
                           check_files=False)


def recipe_of(family: str, method: str, modes: tuple[str, ...], *extra: str):
    """The recipe with these settings, validated as load_recipe validates it (built from one parsed recipe:
    parsing ~700 YAML recipes would cost minutes)."""
    recipe = copy.deepcopy(_BASE_RECIPE)
    recipe.model.family, recipe.adapter.method = family, method
    recipe.adapter.components = dict(zip(COMPONENTS, modes))
    for item in extra:
        key, value = item.split("=", 1)
        setattr(recipe.adapter, key.removeprefix("adapter."), yaml.safe_load(value))
    validate(recipe, "recipe", check_files=False)
    return recipe


def split_combinations():
    accepted, rejected = [], []
    for family in FIXTURES:
        for method, modes in itertools.product(METHODS, itertools.product(MODES, repeat=3)):
            try:
                recipe_of(family, method, modes)
                accepted.append((family, method, modes))
            except RecipeError as e:
                rejected.append((family, method, modes, str(e)))
    return accepted, rejected


ACCEPTED, REJECTED = split_combinations()
# with a vision tower: lora / dora need a `lora` component (19 of 27 modes), qlora also one besides the vision
# tower (15; the tower stays full precision unless adapter.quantize_vision), ptuning no `lora` (8), none a `full`
# component and no `lora` (7); text families have only the language model: 1 + 1 + 1 + 2 + 1
EXPECTED_COUNTS = {"glm41v": 19 + 19 + 15 + 7, "glm4v": 68, "visualglm": 68, "glm4": 6, "chatglm": 6}


def test_validation_accepts_what_the_readme_allows():
    counts = {f: sum(1 for a in ACCEPTED if a[0] == f) for f in FIXTURES}
    assert counts == EXPECTED_COUNTS


@pytest.mark.parametrize(("family", "method", "modes", "message"), REJECTED,
                         ids=[f"{f}-{m}-{'-'.join(c)}" for f, m, c, _ in REJECTED])
def test_rejected_combination_is_one_line_naming_the_key(family, method, modes, message):
    assert "\n" not in message
    assert re.search(r"`(adapter\.[a-z_.]+)`", message), message


def test_rejections_say_why():
    def error(*args):
        with pytest.raises(RecipeError) as info:
            recipe_of(*args)
        return str(info.value)

    assert "`adapter.components.vision` is `lora` but glm4 is a text model" in error("glm4", "lora", ("lora",) * 3)
    assert "`adapter.method` is `ptuning`, which is not implemented for glm41v" in \
        error("glm41v", "ptuning", ("frozen",) * 3)
    assert "`adapter.quantize_vision` is false" in error("glm4v", "qlora", ("lora", "frozen", "full"))
    recipe_of("glm4v", "qlora", ("lora", "frozen", "full"), "adapter.quantize_vision=true")  # then it is fine
    assert "`adapter.layers` is [0]" in error("glm4v", "lora", ("lora", "frozen", "full"), "adapter.layers=[0]")


def test_glmtune_check_rejects_in_one_line(tmp_path, capsys):
    from glmtune.cli import main

    recipe = ROOT / "recipes/glm4/lora.yaml"
    assert main(["check", str(recipe), "adapter.components.vision=full", f"model.path={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "`adapter.components.vision` is `full` but glm4 is a text model" in err, err


# --- the accepted combinations, each attached, trained one step, saved and loaded ----------------------------------


@pytest.fixture(scope="module")
def bases(request):
    """Per family: its module, the tiny model (loaded once, deep-copied for every combination), one batch and the
    base logits on it. One thread: these tiny matrices gain nothing from a second one (the whole file measured 21 s
    with 1 thread, 113 s with 2, on a busy 2-core machine); the setting is restored for the rest of the session."""
    from PIL import Image

    from glmtune.models import get_family

    cache, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)

    def get(name: str):
        if name not in cache:
            family = get_family(name)
            path = request.getfixturevalue(FIXTURES[name])
            processor = family.load_processor(path)
            vision = "vision" in family.components
            image = Image.new("RGB", (56, 56), (200, 30, 30))
            turns = [Turn("user", ("<image>" if vision else "") + "What colour is the shape?"),
                     Turn("assistant", "red")]
            batch = processor.collate([processor.encode(turns, [image] if vision else [])])
            base = family.load_model(path)
            cache[name] = family, base, batch, logits_of(base, batch)
        return cache[name]

    yield get
    torch.set_num_threads(threads)


def official(name: str) -> str:
    """A PEFT parameter name -> the base model's name of the weight it trains or wraps."""
    name = name.removeprefix("base_model.model.")
    name = re.sub(r"\.(modules_to_save\.default|original_module)\.", ".", name)
    name = re.sub(r"\.lora_\w+?(\.default)?(\.weight)?$", ".weight", name)
    return name.replace(".base_layer.", ".")


def loss_of(model, batch) -> torch.Tensor:
    from glmtune.train import token_loss_sum

    loss, n = token_loss_sum(model, batch)
    return loss / n


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()


@pytest.mark.parametrize(("family_name", "method", "modes"), ACCEPTED,
                         ids=[f"{f}-{m}-{'-'.join(c)}" for f, m, c in ACCEPTED])
def test_combination_trains_exactly_the_declared_parameters(bases, family_name, method, modes, tmp_path):
    from glmtune.adapters import attach, load_trained, save_trained
    from glmtune.adapters.trainable import component_of

    family, base, batch, base_logits = bases(family_name)
    declared = dict(zip(COMPONENTS, modes))
    cfg = recipe_of(family_name, method, modes).adapter
    torch.manual_seed(0)
    model = attach(copy.deepcopy(base), family, cfg)
    model.train()
    loss_of(model, batch).backward()

    trained = {"lora": {}, "full": {}, "prefix": set()}  # component -> official names
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"{name} is frozen but got a gradient"
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name} is trainable but got no gradient"
        if name.startswith(("base_model.model." + PREFIX, PREFIX)):
            trained["prefix"].add(name)
            continue
        comp = component_of(official(name), family.components)
        kind = "lora" if ".lora_" in name else "full"
        assert declared[comp] == kind, f"{name}: {comp} is {declared[comp]} but this parameter trains as {kind}"
        assert ".original_module." not in name, name
        trained[kind].setdefault(comp, set()).add(official(name))
    for comp in family.components:
        if declared[comp] == "full":  # every parameter of the component, and nothing of another one
            own = {n for n, _ in base.named_parameters() if component_of(n, family.components) == comp}
            assert trained["full"].get(comp) == own, comp
        if declared[comp] == "lora":
            assert trained["lora"].get(comp), f"{comp} is lora but has no LoRA weight"
    assert bool(trained["prefix"]) == (method == "ptuning")
    assert (method in LORA_METHODS) == bool(trained["lora"])

    # move every trained parameter (LoRA B starts at zero), save, load into a fresh base: the same logits
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    model.eval()
    expected = logits_of(model, batch)
    assert (expected - base_logits).abs().max() > 1e-3  # the step changed the model
    save_trained(model, tmp_path, method)
    loaded = load_trained(copy.deepcopy(base), tmp_path, family).eval()
    # the same weights in the same modules: equal up to float summation order (measured 0 here)
    assert (logits_of(loaded, batch) - expected).abs().max() <= 1e-6


# the combinations whose full components PEFT cannot wrap as a whole: a ModuleList (GLM-4.1V's vision blocks), loose
# parameters (GLM-4V's boi/eoi), a name other modules end with and a tied weight (VisualGLM's transformer, lm_head);
# ChatGLM-6B's full language model: the tied lm_head copy in the base shards must not stay stale
MERGED = [("glm41v", "lora", ("full", "full", "lora")), ("glm4v", "dora", ("full", "lora", "lora")),
          ("visualglm", "lora", ("lora", "lora", "full")), ("chatglm", "none", ("frozen", "frozen", "full"))]


@pytest.mark.parametrize(("family_name", "method", "modes"), MERGED,
                         ids=[f"{f}-{m}-{'-'.join(c)}" for f, m, c in MERGED])
def test_merge_folds_every_trained_parameter(request, bases, family_name, method, modes, tmp_path):
    from glmtune.adapters import attach, save_trained
    from glmtune.config import save_recipe
    from glmtune.merge import merge

    family, base, batch, _ = bases(family_name)
    recipe = recipe_of(family_name, method, modes)
    recipe.model.path = str(request.getfixturevalue(FIXTURES[family_name]))
    torch.manual_seed(0)
    model = attach(copy.deepcopy(base), family, recipe.adapter)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    expected = logits_of(model.eval(), batch)
    (tmp_path / "ckpt").mkdir()
    save_trained(model, tmp_path / "ckpt", method)
    save_recipe(recipe, tmp_path / "ckpt" / "recipe.yaml")
    merged = family.load_model(merge(tmp_path / "ckpt", tmp_path / "merged", print_fn=lambda s: None))
    # LoRA folded in fp32 (double for B @ A) vs applied in the forward: measured <= 2e-7 here
    assert (logits_of(merged, batch) - expected).abs().max() <= 1e-5
