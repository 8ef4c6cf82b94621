#!/usr/bin/env python3
"""Golden tensors for GLM-4V-9B parity tests, produced by the UPSTREAM remote code at a tiny size.

The upstream code (THUDM/glm-4v-9b `configuration_chatglm.py`, `modeling_chatglm.py`, `visual.py`, model_type
chatglm) is NOT part of this repository: fetch it into a folder outside the repo (tests/golden/glm4v/SOURCE.md
says from where and with which edits) and run this script in a separate environment whose transformers the remote
code works with (4.44.x), e.g.

    python -m venv /work/venv-upstream
    /work/venv-upstream/bin/pip install torch==2.13.0 transformers==4.44.2 safetensors
    /work/venv-upstream/bin/python scripts/make_glm4v_golden.py --upstream /work/upstream/glm4v

It writes to --out (default tests/golden/glm4v):
    config.json        the tiny config as upstream `save_pretrained` writes it (official glm-4v-9b keys)
    model.safetensors  every tensor of upstream `model.state_dict()` under its upstream (= official checkpoint) name
    golden.safetensors inputs, intermediates and outputs of upstream forward passes and greedy generation
    SOURCE.md          provenance of the upstream files (sha256) and the command that regenerates everything

Tiny vocabulary: ids 0..239 are "text", the 14 GLM-4 special tokens follow in the official order from 240 on, so
each special id is 151329 + k officially and 240 + k here (<|endoftext|>=pad=240 ... <|begin_of_image|>=250,
<|end_of_image|>=251); the embedding is padded to 256.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import math
import shlex
import sys
import types
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
PKG = "glm4v_upstream"  # the upstream folder is imported as this package (its modules use relative imports)

# ---------------------------------------------------------------------------------------------------------------
# Tiny vocabulary: the official special tokens in the official order, moved from 151329 to SPECIAL_BASE.
SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)  # fmt: skip
OFFICIAL_SPECIAL_BASE = 151329
SPECIAL_BASE = 240
TOK = {name: SPECIAL_BASE + k for k, name in enumerate(SPECIAL_TOKENS)}
NEWLINE = 10  # stands for the "\n" after a role token (198 in the real tokenizer); any id < SPECIAL_BASE is text

# The tiny config: every key of the official glm-4v-9b config.json (sizes shrunk), plus rope_ratio (absent from
# the official glm-4v-9b config, i.e. 1 there; 500 in glm-4-9b-chat) so that the RoPE base is exercised.
TINY_CONFIG = {
    "_name_or_path": "glmtune/tiny-glm-4v",
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "auto_map": {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
    },
    "vision_config": {
        "dropout_prob": 0.0,
        "hidden_act": "gelu",
        "in_channels": 3,
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "patch_size": 14,
        "num_heads": 2,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-06,
        "num_positions": (56 // 14) ** 2 + 1,  # 17: 4x4 patches + cls
        "image_size": 56,
        "scaling_factor": 8,
    },
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True,
    "attn_implementation": "sdpa",
    "bias_dropout_fusion": True,
    "ffn_hidden_size": 96,
    "fp32_residual_connection": False,
    "hidden_dropout": 0.0,
    "hidden_size": 64,
    "kv_channels": 16,
    "layernorm_epsilon": 1.5625e-07,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 4,
    "num_layers": 2,
    "original_rope": True,
    "padded_vocab_size": 256,
    "post_layer_norm": True,
    "rmsnorm": True,
    "rope_ratio": 500,
    "seq_length": 8192,
    "use_cache": True,
    # Official: "bfloat16". Upstream builds every module with dtype=config.torch_dtype, so fp32 goldens need this.
    "torch_dtype": "float32",
    "tie_word_embeddings": False,
    "eos_token_id": [TOK["<|endoftext|>"], TOK["<|user|>"], TOK["<|observation|>"]],
    "pad_token_id": TOK["<|endoftext|>"],
    "boi_token_id": TOK["<|begin_of_image|>"],
    "eoi_token_id": TOK["<|end_of_image|>"],
}

# Where the upstream files came from (see SOURCE.md); the sha256 are those of the files this script was run with.
PROVENANCE = {
    "modeling_chatglm.py": {
        "repo": "sophgo/LLM-TPU",
        "commit": "031f42f1ada41fd87417eabc5ccaddc0c7855acd",
        "path": "models/GLM4v/compile/files/glm-4v-9b/modeling_chatglm.py",
        "blob_sha256": "ce1bf9b597624eab7be65708c0b7ab77c2da197edd79ae63fe3db3b467ec0a97",
        "sha256": "55ab5752ec03933fda11adcd8b6e8c4cc2fe12d74679164a3b743ad36cd33b3c",
    },
    "visual.py": {
        "repo": "ssbuild/deep_training",
        "commit": "be072be530fba7e6c98fcad8b28b765b1adbfcb6",
        "path": "src/deep_training/nlp/models/glm4v/visual.py",
        "blob_sha256": "07888453d19558a8b18007471b5553c3b08e91932a22405f74d79a32e880d6b0",
        "sha256": "07888453d19558a8b18007471b5553c3b08e91932a22405f74d79a32e880d6b0",
    },
    "configuration_chatglm.py": {
        "repo": "ssbuild/deep_training",
        "commit": "be072be530fba7e6c98fcad8b28b765b1adbfcb6",
        "path": "src/deep_training/nlp/models/glm4v/configuration_chatglm.py",
        "blob_sha256": "d69231936e19494b9682b48accf0288628560f0f6a91c5e8e9d82095091cf802",
        "sha256": "d69231936e19494b9682b48accf0288628560f0f6a91c5e8e9d82095091cf802",
    },
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    return configuration, modeling


# ---------------------------------------------------------------------------------------------------------------
# Weights: upstream leaves most of them uninitialised (skip_init / torch.empty), so every parameter is drawn here
# from one seeded generator, in state_dict order. Buffers (only rotary_pos_emb.inv_freq) keep the values the
# upstream constructor computed.
EMBEDDING_LIKE = (
    "word_embeddings.weight", "position_embedding.weight", "cls_embedding", "vision.boi", "vision.eoi",
)  # fmt: skip


def init_weights(model: torch.nn.Module, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    kept = []
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name not in params:
                kept.append(name)
                continue
            noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
            if name.endswith(("norm.weight", "norm1.weight")):  # RMSNorm / LayerNorm scales
                value = 1.0 + 0.1 * noise
            elif name.endswith(".bias"):
                value = 0.1 * noise
            elif name.endswith(EMBEDDING_LIKE):
                value = noise
            else:  # Linear / Conv2d weights: roughly unit-variance outputs
                assert tensor.dim() >= 2, name
                value = noise / math.sqrt(math.prod(tensor.shape[1:]))
            tensor.copy_(value.to(tensor.dtype))
    return kept


class RopeProbe:
    """Records the position ids the upstream forward really used.

    Upstream indexes its rotary cache with the (possibly expanded) position ids inside ChatGLMModel.forward and hands
    only the gathered rows to the encoder. This hook reads those rows and maps each back to its unique position in
    the full cache (exact match), so the ids saved are the upstream ones, not a re-derivation. It also records the KV
    length the step attends to.
    """

    def __init__(self, model):
        self.cache = model.transformer.rotary_pos_emb(model.config.seq_length)  # [seq_length, rot/4, 2]
        self.calls = []
        model.transformer.encoder.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        rope = kwargs["rotary_pos_emb"]
        past = kwargs.get("kv_caches")
        past_len = past[0][0].shape[2] if past else 0
        self.calls.append({"position_ids": self.positions(rope), "past_len": past_len, "inputs_embeds": args[0]})

    def positions(self, rope: torch.Tensor) -> torch.Tensor:
        if rope.dim() == 3:  # no position_ids given: rotary_pos_emb[None, :seq_length]
            rope = rope.expand(1, *rope.shape)
        flat = rope.reshape(-1, 1, rope.shape[-2] * 2)
        table = self.cache.reshape(1, -1, self.cache.shape[-2] * 2)
        dist = (flat - table).abs().amax(-1)  # [n, seq_length]
        best = dist.argmin(-1)
        assert torch.all(dist.gather(1, best[:, None]) == 0), "rotary rows do not match the cache exactly"
        return best.reshape(rope.shape[:2])


def left_pad(rows: list[list[int]], pad_id: int):
    """Batch the way the upstream tokenizer's `_pad` does (padding_side left): pad id, mask 0 and position 0."""
    width = max(len(r) for r in rows)
    ids, mask, pos = [], [], []
    for r in rows:
        d = width - len(r)
        ids.append([pad_id] * d + r)
        mask.append([0] * d + [1] * len(r))
        pos.append([0] * d + list(range(len(r))))
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(pos)


def user_prompt(text: list[int], image: bool) -> list[int]:
    """[gMASK]<sop><|user|>\\n[<|begin_of_image|><|endoftext|><|end_of_image|>]{text}<|assistant|> (tiny ids)."""
    ids = [TOK["[gMASK]"], TOK["<sop>"], TOK["<|user|>"], NEWLINE]
    if image:
        ids += [TOK["<|begin_of_image|>"], TOK["<|endoftext|>"], TOK["<|end_of_image|>"]]
    return ids + text + [TOK["<|assistant|>"]]


def greedy(model, probe, n_new: int, **inputs):
    from transformers import GenerationConfig

    gen_config = GenerationConfig(
        do_sample=False, max_new_tokens=n_new, eos_token_id=None, pad_token_id=TOK["<|endoftext|>"], use_cache=True
    )
    probe.calls.clear()
    out = model.generate(**inputs, generation_config=gen_config, return_dict_in_generate=True, output_logits=True)
    prompt_len = inputs["input_ids"].shape[1]
    new_ids = out.sequences[:, prompt_len:]
    assert new_ids.shape[1] == n_new
    logits = torch.stack(out.logits, dim=1).float()  # [batch, n_new, vocab]
    steps = list(probe.calls)
    return new_ids, logits, steps


def run(args) -> None:
    import transformers
    from safetensors.torch import save_file

    if not transformers.__version__.startswith("4.44."):
        print(f"warning: transformers {transformers.__version__}; the goldens were made with 4.44.2", file=sys.stderr)
    upstream = Path(args.upstream).resolve()
    out = Path(args.out)
    if not out.is_absolute():
        out = REPO_ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    configuration, modeling = load_upstream(upstream)

    torch.manual_seed(0)
    config = configuration.ChatGLMConfig(**TINY_CONFIG)
    # Upstream builds modules with dtype=config.torch_dtype (PretrainedConfig turns the string into torch.float32).
    model = modeling.ChatGLMForConditionalGeneration(config, empty_init=True).eval()
    buffers = init_weights(model, seed=args.seed)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    assert all(v.dtype == torch.float32 for v in state.values())

    # --- checkpoint in the official layout -------------------------------------------------------------------
    config.save_pretrained(out)  # writes config.json exactly as upstream save_pretrained does
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})

    probe = RopeProbe(model)
    golden: dict[str, torch.Tensor] = {}
    img_gen = torch.Generator().manual_seed(args.seed + 1)
    image_size = TINY_CONFIG["vision_config"]["image_size"]

    def put(name, tensor):
        golden[name] = tensor.detach().contiguous().clone()

    with torch.no_grad():
        # (a) text only, one prompt -------------------------------------------------------------------------
        ids, mask, pos = left_pad([user_prompt([17, 93, 5, 128, 61], image=False)], TOK["<|endoftext|>"])
        probe.calls.clear()
        o = model(input_ids=ids, attention_mask=mask, position_ids=pos, return_dict=True)
        put("text.input_ids", ids)
        put("text.attention_mask", mask)
        put("text.position_ids", pos)
        put("text.used_position_ids", probe.calls[-1]["position_ids"])
        put("text.logits", o.logits.float())

        # (b) one image ---------------------------------------------------------------------------------------
        images = torch.randn(1, 3, image_size, image_size, generator=img_gen)
        ids, mask, pos = left_pad([user_prompt([17, 93, 5, 128, 61, 7], image=True)], TOK["<|endoftext|>"])
        vit_hidden = {}
        hook = model.transformer.vision.transformer.register_forward_hook(
            lambda m, a, r: vit_hidden.__setitem__("out", r)
        )
        vision_out = model.transformer.vision(images)
        hook.remove()
        probe.calls.clear()
        o = model(input_ids=ids, images=images, attention_mask=mask, position_ids=pos, return_dict=True)
        put("image.input_ids", ids)
        put("image.attention_mask", mask)
        put("image.position_ids", pos)
        put("image.images", images)
        put("image.vit_hidden", vit_hidden["out"])  # after the ViT layers, cls included: [1, 17, 32]
        put("image.vision_out", vision_out)  # [boi, 4 patches, eoi] / scaling_factor: [1, 6, 64]
        put("image.inputs_embeds", probe.calls[-1]["inputs_embeds"])  # merged sequence fed to the encoder
        put("image.used_position_ids", probe.calls[-1]["position_ids"])  # expanded
        put("image.logits", o.logits.float())  # expanded length

        # (c) batches of 2 with left padding --------------------------------------------------------------------
        ids, mask, pos = left_pad(
            [user_prompt([17, 93, 5, 128, 61], image=False), user_prompt([44, 3], image=False)], TOK["<|endoftext|>"]
        )
        probe.calls.clear()
        o = model(input_ids=ids, attention_mask=mask, position_ids=pos, return_dict=True)
        put("text_batch.input_ids", ids)
        put("text_batch.attention_mask", mask)
        put("text_batch.position_ids", pos)
        put("text_batch.used_position_ids", probe.calls[-1]["position_ids"])
        put("text_batch.logits", o.logits.float())

        # With an image, upstream's eval forward needs the attention mask already expanded to the image length
        # (ChatGLMModel.forward builds the padding mask from the merged embeddings); prepare_inputs_for_generation
        # is where upstream expands it, so the batch goes through that function (as generate's first step does).
        batch_images = torch.randn(2, 3, image_size, image_size, generator=img_gen)
        ids, mask, pos = left_pad(
            [user_prompt([17, 93, 5, 128, 61, 7], image=True), user_prompt([44, 3], image=True)],
            TOK["<|endoftext|>"],
        )
        inputs = model.prepare_inputs_for_generation(
            ids, images=batch_images, attention_mask=mask, position_ids=pos, use_cache=True
        )
        inputs["return_last_logit"] = False
        probe.calls.clear()
        o = model(**inputs, return_dict=True)
        put("image_batch.input_ids", ids)
        put("image_batch.attention_mask", mask)
        put("image_batch.position_ids", pos)
        put("image_batch.images", batch_images)
        put("image_batch.attention_mask_expanded", inputs["attention_mask"])
        put("image_batch.used_position_ids", probe.calls[-1]["position_ids"])
        put("image_batch.logits", o.logits.float())

        # (d) greedy generation with KV cache ----------------------------------------------------------------
        n_new = 5
        for case, with_image in (("text", False), ("image", True), ("image_batch", True)):
            kwargs = {
                "input_ids": golden[f"{case}.input_ids"],
                "attention_mask": golden[f"{case}.attention_mask"],
                "position_ids": golden[f"{case}.position_ids"],
            }
            if with_image:
                kwargs["images"] = golden[f"{case}.images"]
            new_ids, logits, steps = greedy(model, probe, n_new, **kwargs)
            assert len(steps) == n_new
            put(f"{case}.gen_ids", new_ids)
            put(f"{case}.gen_logits", logits)  # raw logits of each step: [batch, 5, vocab]
            # position ids and KV length of the 4 decode steps (step 0 is the prompt, checked above)
            put(f"{case}.gen_step_position_ids", torch.cat([s["position_ids"] for s in steps[1:]], dim=1))
            put(f"{case}.gen_step_past_len", torch.tensor([s["past_len"] for s in steps[1:]]))
            # the prompt step must reproduce the plain forward
            torch.testing.assert_close(logits[:, 0], golden[f"{case}.logits"][:, -1], rtol=0, atol=1e-5)

    save_file(golden, out / "golden.safetensors", metadata={"format": "pt"})
    write_source(out, upstream, buffers, golden, state, args)
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({total / 1024:.0f} KiB)")
    for name, t in golden.items():
        print(f"  {name:40s} {str(t.dtype):14s} {tuple(t.shape)}")


def write_source(out: Path, upstream: Path, buffers, golden, state, args) -> None:
    import transformers

    rows = []
    for name, prov in PROVENANCE.items():
        actual = sha256(upstream / name)
        if actual != prov["sha256"]:
            print(f"warning: {name} sha256 {actual} differs from the recorded {prov['sha256']}", file=sys.stderr)
        rows.append(
            f"| {name} | {prov['repo']} | `{prov['path']}` | {prov['commit']} | {prov['blob_sha256']} | {actual} |"
        )
    out_arg = args.out
    if Path(out_arg).is_absolute() and Path(out_arg).resolve().is_relative_to(REPO_ROOT):
        out_arg = str(Path(out_arg).resolve().relative_to(REPO_ROOT))
    cmd = f"/work/venv-upstream/bin/python scripts/make_glm4v_golden.py --upstream {shlex.quote(str(upstream))}"
    if out_arg != "tests/golden/glm4v":
        cmd += f" --out {shlex.quote(out_arg)}"
    golden_rows = "\n".join(
        f"| `{k}` | {str(v.dtype).removeprefix('torch.')} | {tuple(v.shape)} |" for k, v in golden.items()
    )
    fetch_cmds = "\n".join(
        f"git -C <clone of {prov['repo']}> show {prov['commit']}:{prov['path']} > {name}"
        for name, prov in PROVENANCE.items()
    )
    buffer_names = ", ".join(f"`{b}`" for b in buffers)
    special_rows = ", ".join(f"{n} {i}" for n, i in TOK.items())
    text = f"""# GLM-4V golden tensors: provenance

Produced by the **upstream** GLM-4V-9B remote code (model_type `chatglm`) at a tiny size, with
`scripts/make_glm4v_golden.py`. The upstream code itself is not in this repository.

## Regenerate

```bash
python -m venv /work/venv-upstream
/work/venv-upstream/bin/pip install torch==2.13.0 transformers==4.44.2 safetensors
{cmd}
```

Environment used: Python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__},
CPU, fp32, seed {args.seed}. torchvision is not needed (only the upstream tokenizer imports it, and it is not used).

## Preparing the upstream folder (outside this repository)

```bash
mkdir -p /work/upstream/glm4v && cd /work/upstream/glm4v
{fetch_cmds}
# then undo sophgo's three edits in modeling_chatglm.py (listed below); the sha256 must match the table
```

## Upstream files

| file | repository | path | commit | sha256 of the file there | sha256 of the file used |
|---|---|---|---|---|---|
{chr(10).join(rows)}

- `modeling_chatglm.py` is the GLM-4V-9B revision of the 2024-08 HF update (docstring "PyTorch GLM-4V model",
  `CORE_ATTENTION_CLASSES`, `_extract_past_from_model_output` returning `(cache_name, cache)`, attention-mask
  expansion in `prepare_inputs_for_generation`, `self.training` mask expansion for GLM-4 issue 264); sophgo's
  README pins `transformers==4.44.0` for it and its config.json says `transformers_version` 4.44.0. sophgo edited
  three places for their ONNX export; these were undone, nothing else was changed:
  1. `SelfAttention.forward`: sophgo reordered the KV-cache code so the returned cache held only the new token
     (their README, "改动位置", quotes the original lines 557-564). Restored to the original order: concatenate the
     past keys/values first, then return the concatenated `(key_layer, value_layer)` as the cache; their
     commented-out copy of their own intermediate version was removed with it.
  2. `ChatGLMModel.forward`: two debug lines printing "vit begin" / "vit end" around `self.vision(images)` removed.
  3. `ChatGLMModel.forward`: a `pdb.set_trace()` line before `torch.stack(new_input_embeds)` removed.
  The result agrees with derivatives of the same revision wherever they overlap: an annotated Chinese walk-through
  of `chatglm4v-9b/modeling_chatglm.py` (every class except `CoreAttention.forward` and `ChatGLMModel.forward`,
  which it lost), the OpenVINO notebook GLM-4V helper (mask handling of `ChatGLMModel.forward`,
  `prepare_inputs_for_generation`) and ipex-llm's GLM-4V forward (image merge and position ids).
- `visual.py` and `configuration_chatglm.py` come from ssbuild/deep_training's vendored copy of the June-2024
  release (no copy of the 2024-08 files was found). The later `visual.py` differs only by `.to(device)` calls for
  multi-GPU (GLM-4 issue 350) on the MLP output and on boi/eoi (seen in optimum-habana's adaptation and in an
  Ascend port): no numeric change on one device. The later `configuration_chatglm.py` (optimum-habana's copy)
  lacks only the unused `quantization_bit` argument.

## Tiny model

- Config: `config.json` (every key of the official glm-4v-9b config.json, sizes shrunk; `rope_ratio` 500 added,
  absent officially = 1; `torch_dtype` float32 instead of bfloat16 because upstream builds every module with
  `dtype=config.torch_dtype`; `seq_length` 8192).
- Token ids: text ids are arbitrary below {SPECIAL_BASE}; the 14 special tokens keep the official order from
  {SPECIAL_BASE} on (official id = {OFFICIAL_SPECIAL_BASE} + k, tiny id = {SPECIAL_BASE} + k): {special_rows}.
  `"\\n"` after a role token is id {NEWLINE} here.
- Weights: every parameter drawn from `torch.Generator().manual_seed({args.seed})` in `state_dict` order
  (norm scales 1 + 0.1 N(0,1); biases 0.1 N(0,1); Linear/Conv2d weights N(0,1)/sqrt(fan_in); embeddings,
  position embeddings, cls, boi, eoi N(0,1)). Buffers kept as upstream computes them: {buffer_names}
  (in the state dict, hence in model.safetensors; upstream's rotary math never reads it: it recomputes the
  frequencies with base 10000 x rope_ratio, while the buffer uses base 10000).
- `model.safetensors`: {len(state)} tensors, all fp32, named exactly as upstream `state_dict()` (= official names).
- `config.json` is what transformers {transformers.__version__} `save_pretrained` writes: it adds the config class
  defaults (`classifier_dropout`, `pre_seq_len`, `prefix_projection`, `quantization_bit`, `vocab_size`) and drops
  `attn_implementation` (transformers keeps it as the private `_attn_implementation`; this upstream revision ignores
  it anyway: `SelfAttention` always builds `CoreAttention`).

## golden.safetensors

Images are `torch.randn` from `torch.Generator().manual_seed({args.seed + 1})` (already "normalized" pixels; the
image processor is not part of this test). `*.used_position_ids` are the position ids the upstream forward really
indexed its rotary cache with (read back from the rows it gathered), `*.gen_*` come from `model.generate` (greedy,
5 new tokens, no EOS stop, KV cache); `gen_step_*` describe the 4 decode steps after the prompt step.

| tensor | dtype | shape |
|---|---|---|
{golden_rows}

## Upstream behaviour these tensors pin (observed by running it)

- Image merge: embeddings = text[:boi] + vision_out + text[eoi+1:] with exactly one placeholder between
  `<|begin_of_image|>` and `<|end_of_image|>` (asserted upstream); the word embeddings of boi, placeholder and eoi
  are not used. vision_out = [learned boi, patches, learned eoi] / scaling_factor.
- Position ids with an image: boi keeps its index, every patch gets boi's index + 1, eoi and the text after it keep
  their unexpanded indices (`image.used_position_ids`). Decoding continues from the unexpanded length while the KV
  cache holds the expanded one (`*.gen_step_position_ids` vs `*.gen_step_past_len`).
- Left padding: pads get mask 0 and position 0; real tokens count from 0. With an image, upstream's eval forward
  only works when the attention mask is already expanded to the image length, which `prepare_inputs_for_generation`
  does (`image_batch.attention_mask_expanded`); a padded mask of the unexpanded length raises a size mismatch.
"""
    (out / "SOURCE.md").write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", required=True, help="folder with the upstream GLM-4V remote code files")
    parser.add_argument("--out", default="tests/golden/glm4v", help="output folder (relative to the repo root)")
    parser.add_argument("--seed", type=int, default=0)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
