#!/usr/bin/env python3
"""Golden tensors for VisualGLM-6B parity tests, produced by the UPSTREAM code at a tiny size.

Upstream = the HF remote code of THUDM/visualglm-6b (`configuration_chatglm.py`, `modeling_chatglm.py`, `visual.py`;
the text model is ChatGLM-6B's) + SwissArmyTransformer (`sat`) 0.3.6, which `visual.py` uses for the EVA ViT and the
BLIP-2 Q-Former. None of it is part of this repository: fetch the three remote-code files into a folder outside the
repo (tests/golden/visualglm/SOURCE.md says from where) and run this script in a separate environment whose
transformers the remote code works with (4.33.x), e.g.

    python -m venv /work/venv-visualglm
    /work/venv-visualglm/bin/pip install torch==2.13.0 transformers==4.33.3 safetensors einops
    /work/venv-visualglm/bin/pip install --no-deps SwissArmyTransformer==0.3.6
    /work/venv-visualglm/bin/python scripts/make_visualglm_golden.py --upstream /work/upstream/visualglm

It writes to --out (default tests/golden/visualglm):
    config.json        the tiny config as upstream `save_pretrained` writes it (official visualglm-6b keys)
    model.safetensors  every tensor of upstream `model.state_dict()` under its upstream (= official checkpoint) name
    golden.safetensors inputs, intermediates and outputs of upstream forward passes and greedy generation
    SOURCE.md          provenance of the upstream files (sha256) and the command that regenerates everything

Two widths are hard-coded upstream and cannot come from the config: `visual.py` builds `glm_proj` as
`nn.Linear(768, 4096)` and the Q-Former always feeds `arange(32)` as its query ids. A 4096-wide ChatGLM layer alone
is ~270 MB in fp32, so the tiny model keeps 32 query tokens (`image_length` 32, Q-Former vocab 32) but swaps the
hard-coded `glm_proj` for `nn.Linear(qformer hidden, LM hidden)` right after upstream built it (same module type,
same name, same forward; see `patch_glm_proj`). Nothing else is patched and the upstream files are not edited.

Tiny vocabulary (256): ChatGLM-6B's 8 special tokens keep their official order, moved from 130000 to 240
([MASK] 240, [gMASK] 241, [sMASK] 242, <unused_0> 243, <sop>=bos 244, <eop>=eos 245, <ENC> 246, <dBLOCK> 247);
ids below 240 that the prompts use keep their official value (<unk> 0 = image placeholder, <pad> 3, <n> 4, "▁" 5,
"▁<" 46, ">" 33, "▁</" 98, "：" 12); the other official text ids of the prompts get stand-ins 100..107 (STAND_IN).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.metadata
import math
import shlex
import sys
import types
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
PKG = "visualglm_upstream"  # the upstream folder is imported as this package (its modules use relative imports)

# ---------------------------------------------------------------------------------------------------------------
# Token ids. Official ids were obtained by running the official ChatGLMTokenizer (visualglm-6b tokenizer_config,
# ice_text.model sha256 5e974d9a...) on the prompts below; the tiny ids map them into a 256-entry vocabulary.
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
OFFICIAL_SPECIAL_BASE = 130000
SPECIAL_BASE = 240
VOCAB_SIZE = 256
TOK = {name: SPECIAL_BASE + k for k, name in enumerate(SPECIAL_TOKENS)}
UNK, PAD = 0, 3  # <unk> (the image placeholder `build_inputs_with_image` uses) and <pad>: same ids as officially
# official text id -> tiny stand-in (ids below SPECIAL_BASE are kept as they are)
STAND_IN = {
    2265: 100,  # "img"
    64286: 101,  # "问"
    67342: 102,  # "答"
    67194: 103,  # "描述"
    74366: 104,  # "这张"
    65842: 105,  # "图片"
    63823: 106,  # "。"
    74874: 107,  # "你好"
}
# "<img></img>问：描述这张图片。\n答：" split at `rfind("<img>") + 5` as `build_inputs_with_image` does
OFFICIAL_PRE_IMAGE = [46, 2265, 33]  # "▁<" "img" ">"
OFFICIAL_POST_IMAGE = [98, 2265, 33, 64286, 12, 67194, 74366, 65842, 63823, 4, 67342, 12]  # "▁</" "img" ">" 问：...答：
# text-only prompts, as `tokenizer([prompt])` encodes them (the "▁" 5 comes first)
OFFICIAL_TEXT = [5, 64286, 12, 67194, 74366, 65842, 63823, 4, 67342, 12]  # 问：描述这张图片。\n答：
OFFICIAL_TEXT_SHORT = [5, 64286, 12, 74874, 4, 67342, 12]  # 问：你好\n答：
# What the official tokenizer returned for tokenizer(["问：你好\n答：", "问：描述这张图片。\n答："], padding=True):
# the padding below re-implements its `_pad` and is checked against this.
OFFICIAL_PADDED_BATCH = {
    "input_ids": [
        [3, 3, 3, 5, 64286, 12, 74874, 4, 67342, 12, 130001, 130004],
        [5, 64286, 12, 67194, 74366, 65842, 63823, 4, 67342, 12, 130001, 130004],
    ],
    "attention_mask": [[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 12],
    "position_ids": [
        [[0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 7], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]],
        [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]],
    ],
}
OFFICIAL_GMASK, OFFICIAL_BOS = OFFICIAL_SPECIAL_BASE + 1, OFFICIAL_SPECIAL_BASE + 4


def tiny_id(official: int) -> int:
    if official >= OFFICIAL_SPECIAL_BASE:
        return SPECIAL_BASE + official - OFFICIAL_SPECIAL_BASE
    if official in STAND_IN:
        return STAND_IN[official]
    assert official < SPECIAL_BASE and official not in STAND_IN.values(), official
    return official


def with_special(ids: list[int], gmask: int, bos: int) -> list[int]:
    """`ChatGLMTokenizer.build_inputs_with_special_tokens`: ids + [gMASK, <sop>]."""
    return ids + [gmask, bos]


def chatglm_pad(rows: list[list[int]], gmask: int, bos: int, mask: int, pad: int) -> dict[str, list]:
    """`ChatGLMTokenizer._pad` (padding_side left): 2D position ids per row, then pad id / mask 0 / position 0."""
    width = max(len(r) for r in rows)
    out = {"input_ids": [], "attention_mask": [], "position_ids": []}
    for r in rows:
        context = r.index(bos) if bos in r else len(r)
        pos = list(range(len(r)))
        mask_token = gmask if gmask in r else mask
        if mask_token in r:
            pos = pos[:context] + [r.index(mask_token)] * (len(r) - context)
        block = [0] * context + list(range(1, len(r) - context + 1))
        d = width - len(r)
        out["input_ids"].append([pad] * d + r)
        out["attention_mask"].append([0] * d + [1] * len(r))
        out["position_ids"].append([[0] * d + pos, [0] * d + block])
    return out


def text_prompt(official: list[int]) -> list[int]:
    return with_special([tiny_id(i) for i in official], TOK["[gMASK]"], TOK["<sop>"])


def image_prompt(official_pre: list[int], official_post: list[int], image_length: int) -> tuple[list[int], int]:
    """`build_inputs_with_image`: pre + [<unk>] * image_length + post, then [gMASK] <sop>; returns (ids, pre length)."""
    pre = [tiny_id(i) for i in official_pre]
    post = [tiny_id(i) for i in official_post]
    return with_special(pre + [UNK] * image_length + post, TOK["[gMASK]"], TOK["<sop>"]), len(pre)


# ---------------------------------------------------------------------------------------------------------------
# The tiny config: every key of the official visualglm-6b config.json (same order), sizes shrunk.
QFORMER_HIDDEN = 32
EVA_HIDDEN = 32
IMAGE_SIZE = 56  # 4x4 patches of 14 + cls = 17 tokens
TINY_CONFIG = {
    "_name_or_path": "glmtune/tiny-visualglm",
    "architectures": ["ChatGLMModel"],
    "auto_map": {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGenerationWithImage",
        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGenerationWithImage",
    },
    "bos_token_id": TOK["<sop>"],
    "eos_token_id": TOK["<eop>"],
    "mask_token_id": TOK["[MASK]"],
    "gmask_token_id": TOK["[gMASK]"],
    "pad_token_id": PAD,
    "hidden_size": 64,
    "inner_hidden_size": 128,
    "layernorm_epsilon": 1e-05,
    "max_sequence_length": 2048,
    "model_type": "chatglm",
    "num_attention_heads": 4,
    "num_layers": 2,
    "position_encoding_2d": True,
    "torch_dtype": "float16",  # as officially; upstream ignores it (the GLM part is built in fp16 regardless)
    "use_cache": True,
    "vocab_size": VOCAB_SIZE,
    "image_length": 32,  # must stay 32: the Q-Former's query ids are a hard-coded arange(32)
    "eva_config": {
        "num_layers": 2,
        "hidden_size": EVA_HIDDEN,
        "num_attention_heads": 2,
        "vocab_size": 1,
        "layernorm_order": "pre",
        "model_parallel_size": 1,
        "max_sequence_length": (IMAGE_SIZE // 14) ** 2 + 1,  # ViTModel recomputes it as pre_len + patches + post_len
        "inner_hidden_size": 64,
        "use_final_layernorm": False,
        "layernorm_epsilon": 1e-06,
        "image_size": [IMAGE_SIZE, IMAGE_SIZE],
        "pre_len": 1,
        "post_len": 0,
        "in_channels": 3,
        "num_classes": 0,
        "patch_size": 14,
    },
    "qformer_config": {
        "num_layers": 2,
        "hidden_size": QFORMER_HIDDEN,
        "num_attention_heads": 2,
        "vocab_size": 32,
        "layernorm_order": "post",
        "model_parallel_size": 1,
        "max_sequence_length": 0,
        "is_decoder": [True, False],
        "cross_attn_hidden_size": EVA_HIDDEN,
        "layernorm_epsilon": 1e-12,
    },
}

# Where the upstream files came from (see SOURCE.md); the sha256 are those of the files this script was run with.
VISUAL_BRANCH = {
    "repo": "greensheng/chatglm-6b (git mirror of huggingface.co/THUDM/chatglm-6b), branch `visual`",
    "commit": "11f77d9d72c4d314086664bf135910c35c079ca9",
}
PROVENANCE = {
    "modeling_chatglm.py": {
        **VISUAL_BRANCH,
        "blob": "af473a58eb8779a8bcdf02eb82a706c6e3fc8612",
        "sha256": "535222087beef0482073a14d0d5f95320c8b1366359e530467d1526e4d2cf737",
    },
    "configuration_chatglm.py": {
        **VISUAL_BRANCH,
        "blob": "16dacb38f3260a22763897dc9a5419e38dee95b0",
        "sha256": "40cc68d3af2a98f2f8ed84992e1fd861d6b18377fb33577b128106d739696ae1",
    },
    "visual.py": {
        **VISUAL_BRANCH,
        "blob": "9f186509a7d42474c161dd7b50961bc00b50b078",
        "sha256": "64a2e0e9e031cb7b7fa4ef2a82343716bd4fd96d536aaefca57ec5aec94553fc",
    },
}
SAT_WHEEL = {
    "file": "SwissArmyTransformer-0.3.6-py3-none-any.whl",
    "sha256": "1516eae502e963788217ef9ba189bad39a6029e7ad70b222f0f45a2a12409e94",
    "git": "THUDM/SwissArmyTransformer 43eee88284114f15645ce4aab0ce22e1afb0b01a (2023-05-17, '0.3.6')",
}
# the sat modules whose code the tiny forward runs (their sha256 go into SOURCE.md)
SAT_FILES = (
    "model/base_model.py", "model/transformer.py", "model/official/vit_model.py", "transformer_defaults.py",
    "mpu/layers.py", "mpu/utils.py", "ops/layernorm.py",
)  # fmt: skip


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stub_torchvision() -> bool:
    """visual.py imports torchvision at module level for its image *preprocessing* only (BlipImageEvalProcessor).

    The torchvision wheel that matches torch 2.13.0 on PyPI (0.28.0) is a CUDA build whose compiled ops do not load
    against the CPU torch, so when torchvision cannot be imported a stub provides the names visual.py imports; using
    any of them raises. The model forward never touches them.
    """
    try:
        import torchvision  # noqa: F401

        return False
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]

    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision is stubbed: image preprocessing is not available in this environment")

    import importlib.machinery

    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    for module in (tv, transforms, functional):
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    for name in ("Normalize", "Compose", "Resize", "ToTensor"):
        setattr(transforms, name, unavailable)
    functional.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
    transforms.functional = functional
    tv.transforms = transforms
    sys.modules.update(
        {"torchvision": tv, "torchvision.transforms": transforms, "torchvision.transforms.functional": functional}
    )
    return True


def load_upstream(folder: Path):
    """Import configuration_chatglm / modeling_chatglm / visual from `folder` as package PKG."""
    for name in PROVENANCE:
        if not (folder / name).is_file():
            raise SystemExit(f"{folder}: {name} is missing")
    pkg = types.ModuleType(PKG)
    pkg.__path__ = [str(folder)]
    sys.modules[PKG] = pkg
    configuration = importlib.import_module(f"{PKG}.configuration_chatglm")
    modeling = importlib.import_module(f"{PKG}.modeling_chatglm")
    visual = importlib.import_module(f"{PKG}.visual")
    return configuration, modeling, visual


def patch_glm_proj(visual) -> None:
    """Replace BLIP2's hard-coded `glm_proj = nn.Linear(768, 4096)` by Linear(qformer hidden, LM hidden).

    Done inside BLIP2.__init__ right after upstream built it, so it holds for a direct construction and for
    `from_pretrained` alike; module type, name, placement (device/dtype of the Q-Former) and forward are unchanged.
    """
    original_init = visual.BLIP2.__init__
    if getattr(original_init, "_glmtune_patched", False):
        return

    def __init__(self, eva_args, qformer_args, vit=None, qformer=None, **kwargs):
        original_init(self, eva_args, qformer_args, vit=vit, qformer=qformer, **kwargs)
        old = self.glm_proj
        assert type(old) is torch.nn.Linear and (old.in_features, old.out_features) == (768, 4096), old
        ref = next(self.qformer.parameters())
        self.glm_proj = torch.nn.Linear(qformer_args["hidden_size"], TINY_CONFIG["hidden_size"]).to(
            device=ref.device, dtype=ref.dtype
        )

    __init__._glmtune_patched = True
    visual.BLIP2.__init__ = __init__


# ---------------------------------------------------------------------------------------------------------------
# Weights: upstream builds the GLM part with skip_init (uninitialised memory), so every parameter is drawn here from
# one seeded generator, in state_dict order, and rounded to fp16-representable values: `from_pretrained` loads the
# GLM part into fp16 parameters (hard-coded `params_dtype = torch.half`), and the official checkpoint is fp16, so
# the fp32 checkpoint saved here loses nothing when cast to fp16 and every loading path sees the same numbers.
# Buffers (only `rotary_emb.inv_freq`) keep the values the upstream constructor computed.
EMBEDDING_LIKE = ("word_embeddings.weight", "position_embeddings.weight")
# ChatGLM's residual is alpha * LN(x) with alpha = sqrt(56) ~ 7.5 and lm_head is tied to the input embedding: with
# unit-variance sublayer outputs the 2-layer tiny model just predicts its input token again (greedy then repeats
# one id). The GLM sublayer output projections get this gain so the generated ids vary.
GLM_SUBLAYER_OUT = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
GLM_SUBLAYER_OUT_GAIN = 16.0
# Everything that writes into the EVA residual stream is scaled down so that every EVA LayerNorm (eps 1e-6) and
# ln_vision (eps 1e-5) sees inputs of variance ~1e-3: then the goldens tell those epsilons apart (at variance ~1 a
# wrong eps moves the logits by less than 1e-5).
EVA_STREAM_WRITERS = (
    "transformer.word_embeddings.weight", "transformer.position_embeddings.weight", "patch_embedding.proj.weight",
    "patch_embedding.proj.bias", "attention.dense.weight", "attention.dense.bias", "mlp.dense_4h_to_h.weight",
    "mlp.dense_4h_to_h.bias",
)  # fmt: skip
EVA_STREAM_GAIN = 1.0 / 32


def init_weights(model: torch.nn.Module, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters(remove_duplicate=False))
    kept, seen = [], set()
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name not in params:
                kept.append(name)
                continue
            if id(tensor) in seen:  # tied lm_head.weight: same tensor as transformer.word_embeddings.weight
                continue
            seen.add(id(tensor))
            noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
            if name.endswith(("layernorm.weight", "ln_vision.weight")):
                value = 1.0 + 0.1 * noise
            elif name.endswith(".bias"):
                value = 0.1 * noise
            elif name == "transformer.word_embeddings.weight":  # = lm_head: N(0, 1/hidden) keeps logits ~ N(0, 1)
                value = noise / math.sqrt(tensor.shape[1])
            elif name.endswith(EMBEDDING_LIKE):
                value = noise
            else:  # Linear / Conv2d weights: roughly unit-variance outputs
                assert tensor.dim() >= 2, name
                value = noise / math.sqrt(math.prod(tensor.shape[1:]))
                if name.startswith("transformer.layers.") and name.endswith(GLM_SUBLAYER_OUT):
                    value = value * GLM_SUBLAYER_OUT_GAIN
            if name.startswith("image_encoder.vit.") and name.endswith(EVA_STREAM_WRITERS):
                value = value * EVA_STREAM_GAIN
            if name == "image_encoder.qformer.transformer.word_embeddings.weight":  # the 32 query tokens
                value = value * EVA_STREAM_GAIN  # same reason: the first Q-Former LayerNorm then pins eps 1e-12
            tensor.copy_(value.half().float().to(tensor.dtype))
    return kept


class Probe:
    """Records what the upstream forward really used, per call of the top-level model.

    A pre-hook on the first GLMBlock reads the 2D position ids, the boolean attention mask (True = masked) and the
    KV-cache length it is called with; a pre-hook on ChatGLMModel reads the input embeddings (incl. the image
    embeddings upstream spliced in); forward hooks on the vision stages read their outputs; a hook on the top-level
    model reads the logits of the last position.
    """

    def __init__(self, model):
        self.calls: list[dict] = []
        self.current: dict = {}
        model.register_forward_pre_hook(self._start)
        model.register_forward_hook(self._end)
        model.transformer.register_forward_pre_hook(self._embeds, with_kwargs=True)
        model.transformer.layers[0].register_forward_pre_hook(self._layer0, with_kwargs=True)
        enc = model.image_encoder
        for key, module in (("vit_out", enc.vit), ("qformer_out", enc.qformer), ("image_embeds", enc.glm_proj)):
            module.register_forward_hook(self._stage(key))

    def _start(self, module, args):
        self.current = {}

    def _end(self, module, args, output):
        self.current["last_logits"] = output.logits[:, -1].detach().clone()
        self.calls.append(self.current)

    def _embeds(self, module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            self.current["inputs_embeds"] = kwargs["inputs_embeds"].detach().clone()

    def _layer0(self, module, args, kwargs):
        past = kwargs.get("layer_past")
        self.current["position_ids"] = kwargs["position_ids"].detach().clone()
        self.current["attention_mask"] = kwargs["attention_mask"].detach().clone()
        self.current["past_len"] = past[0].shape[0] if past is not None else 0  # caches are [seq, batch, heads, hn]

    def _stage(self, key):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (list, tuple)) else output
            self.current[key] = out.detach().clone()

        return hook


def greedy(model, probe, n_new: int, **inputs):
    """`model.generate` as upstream `chat()` calls it (input_ids [+ images, pre_image_length]), greedy, KV cache."""
    from transformers import GenerationConfig

    gen_config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=n_new, eos_token_id=None, pad_token_id=PAD, use_cache=True
    )
    probe.calls.clear()
    out = model.generate(**inputs, generation_config=gen_config, return_dict_in_generate=True, output_scores=True)
    prompt_len = inputs["input_ids"].shape[1]
    new_ids = out.sequences[:, prompt_len:]
    assert new_ids.shape[1] == n_new and len(probe.calls) == n_new
    logits = torch.stack([c["last_logits"] for c in probe.calls], dim=1).float()  # [batch, n_new, vocab]
    scores = torch.stack(out.scores, dim=1).float()
    assert torch.equal(logits, scores), "generate applied a logits processor"
    return new_ids, logits, list(probe.calls)


def run(args) -> None:
    import transformers
    from safetensors.torch import load_file, save_file

    stubbed = stub_torchvision()  # after transformers, whose import probes torchvision's metadata

    if not transformers.__version__.startswith("4.33."):
        print(f"warning: transformers {transformers.__version__}; the goldens were made with 4.33.3", file=sys.stderr)
    sat_version = importlib.metadata.version("SwissArmyTransformer")
    if sat_version != "0.3.6":
        print(f"warning: SwissArmyTransformer {sat_version}; the goldens were made with 0.3.6", file=sys.stderr)
    upstream = Path(args.upstream).resolve()
    out = Path(args.out)
    if not out.is_absolute():
        out = REPO_ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    configuration, modeling, visual = load_upstream(upstream)
    patch_glm_proj(visual)
    model_cls = modeling.ChatGLMForConditionalGenerationWithImage

    # --- build, initialise and save (the checkpoint in the official layout) --------------------------------------
    torch.manual_seed(0)
    config = configuration.ChatGLMConfig(**TINY_CONFIG)
    with contextlib.redirect_stdout(sys.stderr):  # sat prints while it sets up its model-parallel group
        built = model_cls(config, empty_init=True)
    assert built.transformer.word_embeddings.weight.dtype == torch.float16  # upstream's hard-coded fp16 GLM part
    built = built.float()
    built.tie_weights()  # what from_pretrained does: lm_head.weight is transformer.word_embeddings.weight
    assert built.lm_head.weight is built.transformer.word_embeddings.weight
    buffers = init_weights(built, seed=args.seed)
    state = {k: v.detach().contiguous().clone() for k, v in built.state_dict().items()}
    assert all(v.dtype == torch.float32 for v in state.values())
    config.save_pretrained(out)  # writes config.json exactly as upstream save_pretrained does
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    del built

    # --- the official loading path: from_pretrained, then .float() for a CPU fp32 run ---------------------------
    with contextlib.redirect_stdout(sys.stderr):
        model = model_cls.from_pretrained(out)
    assert model.transformer.word_embeddings.weight.dtype == torch.float16
    assert model.image_encoder.vit.transformer.word_embeddings.weight.dtype == torch.float32
    model = model.float().eval()
    loaded = model.state_dict()
    assert list(loaded) == list(state), "state_dict names/order differ between construction and from_pretrained"
    for name, value in state.items():
        assert torch.equal(loaded[name], value), f"{name} differs after from_pretrained + .float()"
    assert model.lm_head.weight is model.transformer.word_embeddings.weight

    probe = Probe(model)
    golden: dict[str, torch.Tensor] = {}
    img_gen = torch.Generator().manual_seed(args.seed + 1)
    image_length = TINY_CONFIG["image_length"]

    def put(name, tensor):
        golden[name] = tensor.detach().contiguous().clone()

    with torch.no_grad():
        # (a) text only: chat() without an image passes input_ids only; upstream computes mask and positions -------
        ids = torch.tensor([text_prompt(OFFICIAL_TEXT)])
        probe.calls.clear()
        o = model(input_ids=ids, return_dict=True)
        call = probe.calls[-1]
        put("text.input_ids", ids)
        put("text.position_ids", call["position_ids"])
        put("text.full_attention_mask", call["attention_mask"])
        put("text.logits", o.logits.float())

        # (a') left-padded text batch: input_ids, attention_mask and position_ids as the tokenizer pads them --------
        official = chatglm_pad(
            [with_special(r, OFFICIAL_GMASK, OFFICIAL_BOS) for r in (OFFICIAL_TEXT_SHORT, OFFICIAL_TEXT)],
            OFFICIAL_GMASK, OFFICIAL_BOS, OFFICIAL_SPECIAL_BASE, PAD,
        )  # fmt: skip
        assert official == OFFICIAL_PADDED_BATCH, official
        batch = chatglm_pad(
            [text_prompt(OFFICIAL_TEXT_SHORT), text_prompt(OFFICIAL_TEXT)],
            TOK["[gMASK]"], TOK["<sop>"], TOK["[MASK]"], PAD,
        )  # fmt: skip
        batch = {k: torch.tensor(v) for k, v in batch.items()}
        probe.calls.clear()
        o = model(**batch, return_dict=True)
        call = probe.calls[-1]
        put("text_batch.input_ids", batch["input_ids"])
        put("text_batch.attention_mask", batch["attention_mask"])
        put("text_batch.position_ids", batch["position_ids"])
        put("text_batch.full_attention_mask", call["attention_mask"])
        put("text_batch.logits", o.logits.float())

        # (b) one image: <img> + 32 x <unk> + </img> + question, [gMASK] <sop>; images [1, 3, 56, 56] -------------
        image_ids, pre_len = image_prompt(OFFICIAL_PRE_IMAGE, OFFICIAL_POST_IMAGE, image_length)
        ids = torch.tensor([image_ids])
        images = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=img_gen)
        probe.calls.clear()
        o = model(input_ids=ids, images=images, pre_image_length=pre_len, return_dict=True)
        call = probe.calls[-1]
        put("image.input_ids", ids)
        put("image.pre_image_length", torch.tensor(pre_len))
        put("image.images", images)
        put("image.vit_out", call["vit_out"])
        put("image.qformer_out", call["qformer_out"])
        put("image.image_embeds", call["image_embeds"])
        put("image.inputs_embeds", call["inputs_embeds"])
        put("image.position_ids", call["position_ids"])
        put("image.full_attention_mask", call["attention_mask"])
        put("image.logits", o.logits.float())
        emb = call["inputs_embeds"]
        assert torch.equal(emb[:, pre_len : pre_len + image_length], call["image_embeds"])

        # (b') two images, two prompts of the same length (pre_image_length is one int for the whole batch) --------
        other_post = [tiny_id(i) for i in OFFICIAL_POST_IMAGE]
        other_post[5:9] = [110, 111, 112, 113]  # a different 4-token question (arbitrary text ids)
        row1 = with_special(image_ids[: pre_len + image_length] + other_post, TOK["[gMASK]"], TOK["<sop>"])
        ids2 = torch.tensor([image_ids, row1])
        assert ids2.shape[1] == len(image_ids)
        images2 = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=img_gen)
        probe.calls.clear()
        o = model(input_ids=ids2, images=images2, pre_image_length=pre_len, return_dict=True)
        call = probe.calls[-1]
        put("image_batch.input_ids", ids2)
        put("image_batch.images", images2)
        put("image_batch.image_embeds", call["image_embeds"])
        put("image_batch.logits", o.logits.float())

        # (c) greedy generation with the KV cache, as chat() calls generate (no attention_mask/position_ids given) --
        n_new = 5
        cases = {
            "text": {"input_ids": golden["text.input_ids"], "pre_image_length": 0},
            "image": {"input_ids": golden["image.input_ids"], "images": images, "pre_image_length": pre_len},
        }
        for case, kwargs in cases.items():
            new_ids, logits, steps = greedy(model, probe, n_new, **kwargs)
            put(f"{case}.gen_ids", new_ids)
            put(f"{case}.gen_logits", logits)  # raw logits of each step: [batch, 5, vocab]
            # position ids [batch, 2, 1] and KV length of the 4 decode steps (step 0 is the prompt, checked above)
            put(f"{case}.gen_step_position_ids", torch.cat([s["position_ids"] for s in steps[1:]], dim=2))
            put(f"{case}.gen_step_past_len", torch.tensor([s["past_len"] for s in steps[1:]]))
            torch.testing.assert_close(logits[:, 0], golden[f"{case}.logits"][:, -1], rtol=0, atol=1e-5)
            torch.testing.assert_close(steps[0]["position_ids"], golden[f"{case}.position_ids"], rtol=0, atol=0)

    noise = fp64_check(model, golden)  # numerical noise floor: the same upstream model in float64

    save_file(golden, out / "golden.safetensors", metadata={"format": "pt"})
    assert set(load_file(str(out / "golden.safetensors"))) == set(golden)
    write_source(out, upstream, buffers, golden, state, args, stubbed, sat_version, noise)
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({total / 1024:.0f} KiB)")
    for name, t in golden.items():
        print(f"  {name:34s} {str(t.dtype):14s} {tuple(t.shape)}")
    print(f"fp32 vs fp64 upstream, max |logits diff|: {noise}")


def fp64_check(model, golden) -> dict[str, float]:
    """Runs the same upstream model in float64 and returns the largest |fp32 - fp64| logit difference per case."""
    import copy

    m64 = copy.deepcopy(model).double()
    out = {}
    with torch.no_grad():
        o = m64(input_ids=golden["text.input_ids"], return_dict=True)
        out["text"] = (o.logits - golden["text.logits"].double()).abs().max().item()
        o = m64(
            input_ids=golden["text_batch.input_ids"],
            attention_mask=golden["text_batch.attention_mask"],
            position_ids=golden["text_batch.position_ids"],
            return_dict=True,
        )
        real = golden["text_batch.attention_mask"].bool()
        out["text_batch (real tokens)"] = (o.logits - golden["text_batch.logits"].double())[real].abs().max().item()
        pre = int(golden["image.pre_image_length"])
        o = m64(input_ids=golden["image.input_ids"], images=golden["image.images"].double(), pre_image_length=pre)
        out["image"] = (o.logits - golden["image.logits"].double()).abs().max().item()
        o = m64(input_ids=golden["image_batch.input_ids"], images=golden["image_batch.images"].double(),
                pre_image_length=pre)  # fmt: skip
        out["image_batch"] = (o.logits - golden["image_batch.logits"].double()).abs().max().item()
    return out


def write_source(out: Path, upstream: Path, buffers, golden, state, args, stubbed, sat_version, noise) -> None:
    import sat
    import transformers

    rows = []
    for name, prov in PROVENANCE.items():
        actual = sha256(upstream / name)
        if actual != prov["sha256"]:
            print(f"warning: {name} sha256 {actual} differs from the recorded {prov['sha256']}", file=sys.stderr)
        rows.append(f"| {name} | `{prov['commit']}` | {prov['blob']} | {actual} |")
    sat_dir = Path(sat.__file__).parent
    sat_rows = "\n".join(f"| `sat/{f}` | {sha256(sat_dir / f)} |" for f in SAT_FILES)
    out_arg = args.out
    if Path(out_arg).is_absolute() and Path(out_arg).resolve().is_relative_to(REPO_ROOT):
        out_arg = str(Path(out_arg).resolve().relative_to(REPO_ROOT))
    cmd = f"/work/venv-visualglm/bin/python scripts/make_visualglm_golden.py --upstream {shlex.quote(str(upstream))}"
    if out_arg != "tests/golden/visualglm":
        cmd += f" --out {shlex.quote(out_arg)}"
    golden_rows = "\n".join(
        f"| `{k}` | {str(v.dtype).removeprefix('torch.')} | {tuple(v.shape)} |" for k, v in golden.items()
    )
    state_rows = "\n".join(f"| `{k}` | {tuple(v.shape)} |" for k, v in state.items() if ".layers.1." not in k)
    fetch_cmds = "\n".join(
        f"git -C <clone of greensheng/chatglm-6b> show {prov['commit']}:{name} > {name}"
        for name, prov in PROVENANCE.items()
    )
    buffer_names = ", ".join(f"`{b}`" for b in buffers)
    special_rows = ", ".join(f"{n} {i}" for n, i in TOK.items())
    config_ids = ", ".join(f"{key} {TINY_CONFIG[key]}" for key in ("bos_token_id", "eos_token_id", "mask_token_id",
                                                                    "gmask_token_id"))  # fmt: skip
    sat_file, sat_sha, sat_git = SAT_WHEEL["file"], SAT_WHEEL["sha256"], SAT_WHEEL["git"]
    stand_in_rows = ", ".join(f"{o} -> {t}" for o, t in STAND_IN.items())
    noise_rows = "; ".join(f"{k} {v:.1e}" for k, v in noise.items())
    g = golden
    text_ids = g["text.input_ids"][0].tolist()
    image_ids = g["image.input_ids"][0].tolist()
    pre = int(g["image.pre_image_length"])
    image_ids_short = f"{image_ids[:pre]} + [0] * 32 + {image_ids[pre + 32 :]}"
    torchvision_note = (
        "torchvision was **stubbed** (PyPI's torchvision 0.28.0 for torch 2.13.0 is a CUDA build that does not load "
        "with the CPU torch): `visual.py` imports it at module level for `BlipImageEvalProcessor` only, which the "
        "forward never uses; the stub raises if called."
        if stubbed
        else "torchvision was importable and imported as is (only the image preprocessor uses it)."
    )
    text = f"""# VisualGLM-6B golden tensors: provenance

Produced by the **upstream** VisualGLM-6B code (HF remote code of THUDM/visualglm-6b + SwissArmyTransformer
{sat_version}) at a tiny size, with `scripts/make_visualglm_golden.py`. The upstream code is not in this repository.

## Regenerate

```bash
python -m venv /work/venv-visualglm
/work/venv-visualglm/bin/pip install torch==2.13.0 transformers==4.33.3 safetensors einops
/work/venv-visualglm/bin/pip install --no-deps SwissArmyTransformer==0.3.6   # deepspeed etc. are not needed
{cmd}
```

Environment used: Python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__},
SwissArmyTransformer {sat_version} (PyPI wheel, no deps; einops is the only extra import it needs), CPU, fp32,
seed {args.seed}. {torchvision_note} `sat` prints that DeepSpeed is missing (it falls back to torch checkpointing)
and, in model-only mode, initialises a one-process gloo group on localhost; neither matters here.

## Preparing the upstream folder (outside this repository)

```bash
mkdir -p /work/upstream/visualglm && cd /work/upstream/visualglm
{fetch_cmds}
```

## Upstream files

| file | commit (branch `visual` of greensheng/chatglm-6b) | git blob | sha256 of the file used |
|---|---|---|---|
{chr(10).join(rows)}

- greensheng/chatglm-6b is a git clone of the HF repo huggingface.co/THUDM/chatglm-6b with all its branches;
  `visual` is THUDM's (duzx16) development branch of the visual model, last commit 2023-05-22 "Update names Update
  pytorch_model.bin.index.json"; its config.json, tokenizer_config.json and index are the ones in
  shared/reference/visualglm-6b (see shared/reference/SOURCES.md). samfunmula/visualGLM ships the released HF
  revision (f4f759ac) of modeling_chatglm.py: identical except for a user patch (`.to('cuda:0')`).
  THUDM/VisualGLM-6B's own SAT-side `model/blip2.py` (commit a49d4cf9d2af145d06475da62195dbb778eeb731) has the
  same EVAViT / QFormer / BLIP2 / preprocessor code (it adds sat MODEL_URLS entries and two unused imports).
- SwissArmyTransformer: PyPI `{sat_file}` (sha256 {sat_sha}); its `sat/` tree equals
  {sat_git} (only two non-code files under `tokenization/cogview/vqvae` are missing from the wheel).
  sha256 of the installed modules the forward runs:

| file | sha256 |
|---|---|
{sat_rows}

## Tiny model

- Config: `config.json` = every key of the official visualglm-6b config.json with shrunk sizes (LM: 2 layers,
  hidden 64, 4 heads x 16, inner 128, vocab {VOCAB_SIZE}; EVA: 2 layers, hidden 32, 2 heads, ffn 64, {IMAGE_SIZE} px,
  patch 14, 17 tokens; Q-Former: 2 layers, hidden 32, 2 heads, ffn 4 x 32 (default), cross-attention in layer 0,
  cross_attn_hidden_size 32; `image_length` 32), as transformers {transformers.__version__} `save_pretrained` writes
  it (it adds the class defaults `quantization_bit`, `pre_seq_len`, `prefix_projection`). `torch_dtype` stays
  "float16" as officially: upstream never reads it (the GLM part is built in fp16 whatever the config says).
- **Deviation (hard-coded widths):** upstream `BLIP2` builds `glm_proj = nn.Linear(768, 4096)` whatever the config;
  the script replaces it, right after upstream built it, by `nn.Linear(32, 64)` (Q-Former hidden -> LM hidden),
  same name/type/forward. The Q-Former's query ids are a hard-coded `arange(32)`, so `image_length` and the
  Q-Former vocab stay 32. Nothing else is patched; the upstream files are used unmodified.
- Token ids: the 8 ChatGLM-6B special tokens keep their official order from {SPECIAL_BASE} on (official id =
  {OFFICIAL_SPECIAL_BASE} + k, tiny id = {SPECIAL_BASE} + k): {special_rows}. Config: {config_ids}, pad {PAD}
  (official 3); image placeholder = <unk> {UNK} (official 0). The prompts are the official token ids of the
  prompts below (official ChatGLMTokenizer with ice_text.model), with ids < {SPECIAL_BASE} kept and these official
  ids replaced by stand-ins: {stand_in_rows}.
  - text: `问：描述这张图片。\\n答：` -> {text_ids}
  - image: `<img></img>问：描述这张图片。\\n答：` split at `rfind("<img>") + 5` -> {image_ids_short},
    `pre_image_length` {pre}
  - text_batch: `问：你好\\n答：` and the text prompt, left-padded exactly as the official tokenizer's `_pad`
    (checked in the script against the official tokenizer's output for the official ids).
  - image_batch row 1: the image prompt with the 4 question ids replaced by 110..113 (arbitrary).
- Weights: every parameter drawn from `torch.Generator().manual_seed({args.seed})` in `state_dict` order
  (LayerNorm scales 1 + 0.1 N(0,1); biases 0.1 N(0,1); Linear/Conv2d weights N(0,1)/sqrt(fan_in), times
  {GLM_SUBLAYER_OUT_GAIN:g} for the GLM layers' `attention.dense` and `mlp.dense_4h_to_h` (otherwise the alpha-scaled
  residual and the tied lm_head make greedy repeat the input token); the GLM `transformer.word_embeddings` (= lm_head)
  N(0,1)/sqrt(hidden); EVA word (cls) and position embeddings N(0,1); everything that writes into the EVA residual
  stream (cls, position embeddings, patch conv weight and bias, `attention.dense` and `mlp.dense_4h_to_h` weight
  and bias) and the 32 Q-Former query embeddings times {EVA_STREAM_GAIN:g}, so that the EVA, `ln_vision` and first
  Q-Former LayerNorms see inputs of variance ~1e-3 and their epsilons show in the outputs), then rounded to
  fp16-representable values (so the fp32 file loses nothing cast to fp16, the official checkpoint dtype, and
  `from_pretrained`, which loads the GLM part into fp16 parameters, sees the same numbers). `lm_head.weight` is
  tied to `transformer.word_embeddings.weight` (as `from_pretrained` ties them) and stored under both names.
- Buffers kept as upstream computes them: {buffer_names}: `1 / 10000^(arange(0, 8, 2) / 8)` **rounded to fp16**
  (RotaryEmbedding calls `.half()`; `.float()` keeps the rounded values) and never loaded from a checkpoint
  (`_load_from_state_dict` is a no-op). The rotary math reads this buffer.
- Loading path used for every golden: build -> `.float()` -> init -> `save_pretrained`-style files, then
  `ChatGLMForConditionalGenerationWithImage.from_pretrained(out)` (GLM part fp16, vision fp32, tied lm_head,
  eval mode) -> `.float()`, the official CPU recipe; its state_dict equals model.safetensors exactly.
- `model.safetensors`: {len(state)} tensors, all fp32, named exactly as upstream `state_dict()` (= the official
  checkpoint names of shared/reference/visualglm-6b/pytorch_model.bin.index.json). Layer 0 of each stack and
  everything else (layer 1 has the same shapes, without cross-attention in the Q-Former):

| name | shape |
|---|---|
{state_rows}

P-tuning v2 goldens on these weights (`pre_seq_len` set, fixed prefix weights): `../visualglm_ptuning/`, made by
`scripts/make_visualglm_ptuning_golden.py` after this script (it records this model.safetensors' sha256).

## golden.safetensors

Images are `torch.randn` from `torch.Generator().manual_seed({args.seed + 1})` (already "normalized" pixels; the
image preprocessor is not covered: with the stub it cannot run). `*.position_ids` `[batch, 2, seq]` (row 0
position, row 1 block position) and `*.full_attention_mask` `[batch, 1, seq, seq]` bool (**True = masked**) are what
the first GLM layer received; `text_batch.attention_mask` / `text_batch.position_ids` are the tokenizer-style 2D
padding mask and position ids given to the model. `image.vit_out` is the EVA output after `ln_vision` (cls first),
`image.qformer_out` the Q-Former output after its final LayerNorm, `*.image_embeds` the `glm_proj` output,
`image.inputs_embeds` what ChatGLMModel received. `*.gen_*` come from `model.generate` (greedy, 5 new tokens, no
EOS stop, KV cache) called the way `chat()` calls it (input_ids [+ images, pre_image_length], no attention_mask /
position_ids: generate adds an all-ones mask); `gen_logits` are the raw logits of each step; `gen_step_*` describe
the 4 decode steps after the prompt step (position ids `[batch, 2, 4]`, KV length seen by the step).

Numerical noise: the same upstream model run in float64 differs from these fp32 logits by at most {noise_rows}
(max |diff|). An independent float64 re-implementation (written from reading the code, not kept) reproduced every
tensor here within 2.2e-6; with one detail changed it misses the logits by: fp32 instead of fp16-rounded `inv_freq`
1.3e-4..4.5e-4, erf GELU in the GLM MLP 8.5e-4, tanh GELU in EVA/Q-Former 5e-4, GLM LayerNorm eps 1e-6 1.3e-3,
EVA eps 1e-5 3.5e-3, `ln_vision` eps 1e-6 1.4e-3, Q-Former eps 1e-5 6e-3, residual alpha sqrt(2 x 2) 2.5
(the EVA stream and Q-Former query scaling above exist to make the eps choices visible).

| tensor | dtype | shape |
|---|---|---|
{golden_rows}

## Upstream behaviour these tensors pin (observed by running it)

- GLM block (ChatGLM-6B): `a = LN(x)`; `h = a * alpha + dense(attn(a))`; `m = LN(h)`; `out = m * alpha + MLP(m)`,
  alpha = sqrt(2 x 28) whatever `num_layers` is (GLMBlock's `num_layers` defaults to 28 and is not passed); final
  LayerNorm, then `lm_head` = the word embeddings (tied). LayerNorm eps `layernorm_epsilon` (1e-5). MLP
  `dense_4h_to_h(gelu_tanh(dense_h_to_4h(m)))` with biases, not gated.
- GLM attention: `query_key_value` output viewed as `[seq, batch, heads, 3 * head_dim]` and split per head into
  q|k|v. 2D RoPE: q, k split in halves of head_dim/2; first half rotated with `position_ids[:, 0]`, second half
  with `position_ids[:, 1]`; rotate-half convention (`cat(-x2, x1)`), `emb = cat(freqs, freqs)`, rotary dim
  head_dim/2, base 10000, `inv_freq` rounded to fp16. Scores `q k^T / sqrt(head_dim)` (upstream divides q by
  sqrt(hd) * (layer_id + 1) and multiplies the fp32 scores back by (layer_id + 1)); masked scores = -10000
  (before that multiplication); softmax in fp32. KV cache per layer: `(key, value)` `[seq, batch, heads, head_dim]`
  after RoPE.
- Prefix-LM mask from `<sop>` (`bos_token_id`): every query sees the columns `[0, index(<sop>))`, causal
  elsewhere; with a 2D padding mask, padding rows and columns are masked as well. A fully masked row (a pad query)
  gets uniform attention over all keys (finite -10000, no NaN): its logits are in `text_batch.logits` too.
  Decode steps with the cache mask nothing.
- Position ids: position = index in the context, then the `[gMASK]` index for `<sop>` and every later token; block
  position 0 in the context, then 1, 2, ... from `<sop>` on. Left padding (tokenizer `_pad`): computed on the
  unpadded row, pads get 0, so real tokens count from 0. Decode step k (1..4): position = the `[gMASK]` index, block
  position k + 1 (`prepare_inputs_for_generation` recomputes them from the full ids and keeps the last column).
- EVA ViT (SAT `ViTModel`, pre-LN, eps 1e-6): `[cls = word_embeddings[0], conv14(image) patches] +
  position_embeddings` (all 1 + patches rows); per layer `x = x + dense(attn(LN(x)))`, `x = x + MLP(LN(x))`,
  exact (erf) GELU; fused `query_key_value` split as `[all q | all k | all v]`; no final LayerNorm
  (`use_final_layernorm` false); then `ln_vision` (nn.LayerNorm, eps 1e-5) on every token incl. cls; all 17
  tokens go to the Q-Former. No attention mask.
- Q-Former (SAT BaseTransformer, `layernorm_order` "post", eps 1e-12): input = `word_embeddings[arange(32)]`, no
  position embeddings; per layer `a = LN_in(x)`; `h = a + dense(selfattn(a))`; `m = LN_post_attn(h)`; on
  `is_decoder` layers (even: 0, 2, ...) `h = m + dense(crossattn(query(m), key_value(enc)))`,
  `m = LN_post_cross(h)`; `x = m + MLP(m)` (exact GELU, ffn 4 x hidden); after the last layer `final_layernorm`.
  Self-attention qkv `[all q | all k | all v]`; cross-attention `key_value` `[all k | all v]` from the EVA width.
  (The "post-LN" of SAT puts each LayerNorm at the input of the next sublayer; BERT's embedding LayerNorm is layer
  0's `input_layernorm` and the last output LayerNorm is `final_layernorm`.)
- `glm_proj` Linear(Q-Former hidden -> LM hidden) on the 32 query outputs (768 -> 4096 hard-coded officially).
- With an image: inputs_embeds = word_emb(ids[:pre]) + image_embeds + word_emb(ids[pre + 32:]) on the first
  forward only (`pre_image_length` is one int for the batch); the placeholder ids (<unk> 0) stay in `input_ids`
  and count for mask and positions; later decode steps ignore `images`.
"""
    (out / "SOURCE.md").write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", required=True, help="folder with the upstream VisualGLM remote code files")
    parser.add_argument("--out", default="tests/golden/visualglm", help="output folder (relative to the repo root)")
    parser.add_argument("--seed", type=int, default=0)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
