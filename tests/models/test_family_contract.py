"""Every registered family against the contract in glmtune/models/family.py: declared members exist, the
declaration agrees with the model its functions build, detection picks exactly one family per checkpoint, and the
registry imports no torch (recipe validation and `glmtune --help` stay fast)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from glmtune.errors import CheckpointError
from glmtune.models import FAMILIES, detect_family, families_with
from glmtune.models.family import CAPABILITIES, Family

FIXTURES = {name: f"tiny_{name}" for name in FAMILIES}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_provides_what_it_declares(name):
    family = FAMILIES[name]
    assert isinstance(family, Family) and family.name == name
    assert family.missing() == [], f"{name} lacks {family.missing()}"
    assert set(family.capabilities) <= CAPABILITIES
    assert set(family.components) <= {"vision", "projector", "language"} and "language" in family.components
    assert set(family.lora_targets) == set(family.components), name
    assert family.has("ptuning") == family.provides("add_prefix"), "declare ptuning iff add_prefix exists"
    if family.has("vision"):
        assert family.token_embedding, f"{name}: a vision family names where image features are written"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_declaration_matches_the_built_model(name, request):
    """Each component prefix, the output layer and the token embedding name modules of the tiny model, and the tiny
    checkpoint is detected as this family and no other."""
    family = FAMILIES[name]
    path = request.getfixturevalue(FIXTURES[name])
    assert detect_family(path) == name
    model = family.build_model(path, meta=True)
    modules = dict(model.named_modules())
    params = [n for n, _ in model.named_parameters()]
    for component, prefixes in family.components.items():
        for prefix in prefixes:
            assert prefix in modules or any(p.startswith(prefix + ".") for p in params), (name, component, prefix)
    assert family.output_layer in modules, name
    if family.token_embedding:
        assert family.token_embedding in modules, name
    raw = json.loads((path / "config.json").read_text())
    assert [f for f in FAMILIES.values() if f.recognizes(raw)] == [family]


def test_unknown_config_names_every_family(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="model_type 'llama'.*not a supported family.*glm41v"):
        detect_family(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        detect_family(tmp_path)


def test_capability_lists_derive_from_declarations():
    assert families_with("ptuning") == [n for n, f in FAMILIES.items() if "ptuning" in f.capabilities]
    assert set(families_with("vision")) == {n for n, f in FAMILIES.items() if "vision" in f.components}


def test_declaration_rejects_unknown_capability():
    with pytest.raises(ValueError, match="unknown capabilities"):
        Family(name="x", title="X", module="x", recognizes=lambda c: False, components={"language": ("m",)},
               lora_targets={"language": ("q",)}, output_layer="lm_head", capabilities=frozenset({"telepathy"}))


def test_registry_imports_no_torch():
    code = "import sys, glmtune.models, glmtune.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

