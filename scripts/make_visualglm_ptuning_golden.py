#!/usr/bin/env python3
"""Golden tensors for ChatGLM-6B / VisualGLM-6B P-tuning v2 parity, produced by the UPSTREAM remote code.

The same upstream files, environment and tiny model as scripts/make_visualglm_golden.py (whose helpers this script
imports), with `pre_seq_len` set: upstream then builds `transformer.prefix_encoder` (`embedding`, and with
`prefix_projection` the `trans` MLP) and feeds the prefix to every layer as past keys/values. The base weights are
read from tests/golden/visualglm/model.safetensors (made by the sibling script; its sha256 is recorded), only the
prefix weights are drawn here. Run it after the sibling script, in the same environment:

    /work/venv-visualglm/bin/python scripts/make_visualglm_ptuning_golden.py --upstream /work/upstream/visualglm

It writes to --out (default tests/golden/visualglm_ptuning):
    golden.safetensors  per variant (`plain`: prefix_projection false, `projection`: true) the prefix weights under
                        their upstream names (`{variant}.weights.transformer.prefix_encoder...`) and the inputs and
                        outputs of upstream forward passes and greedy generation (`{variant}.{case}.{tensor}`)
    SOURCE.md           provenance and what the tensors are
Upstream's config for a variant is tests/golden/visualglm/config.json with `pre_seq_len` and `prefix_projection` set
(checked here against what upstream `save_pretrained` writes). One deviation: upstream's image path raises with a
prefix (see check_image_path_bug), so the image case feeds upstream's own image embeddings through a forward hook
on the word embeddings (spliced_image); SOURCE.md says so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("make_visualglm_golden", HERE / "make_visualglm_golden.py")
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)

PRE_SEQ_LEN = 5  # differs from every other tiny size (heads 4, layers 2, batch 2), so a wrong view cannot pass
VARIANTS = {"plain": False, "projection": True}
N_NEW = 5
PREFIX = "transformer.prefix_encoder."


def init_prefix(model, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Prefix weights, fp16-representable like the base: embedding N(0,1) (torch's nn.Embedding init, which upstream
    keeps), Linear weights N(0,1)/sqrt(fan_in), biases 0.1 N(0,1)."""
    out = {}
    with torch.no_grad():
        for name, p in model.transformer.prefix_encoder.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("bias"):
                value = 0.1 * noise
            elif name.startswith("trans."):
                value = noise / math.sqrt(p.shape[1])
            else:
                value = noise
            p.copy_(value.half().float())
            out[PREFIX + name] = p.detach().clone()
    return out


def build_variant(configuration, model_cls, base_state, base_config, projection: bool, gen, workdir: Path):
    """Upstream model with a prefix: base weights + drawn prefix weights, saved in the official full layout
    (config.json with pre_seq_len, all weights) and loaded back through `from_pretrained` (fp16 GLM part)."""
    from safetensors.torch import save_file

    config = configuration.ChatGLMConfig(**base.TINY_CONFIG, pre_seq_len=PRE_SEQ_LEN, prefix_projection=projection)
    with contextlib.redirect_stdout(sys.stderr):
        built = model_cls(config, empty_init=True)
    built = built.float()
    built.tie_weights()
    missing, unexpected = built.load_state_dict(base_state, strict=False)
    assert not unexpected and all(m.startswith(PREFIX) for m in missing) and missing, (missing, unexpected)
    prefix = init_prefix(built, gen)
    state = {k: v.detach().contiguous().clone() for k, v in built.state_dict().items()}
    config.save_pretrained(workdir)
    saved = json.loads((workdir / "config.json").read_text())
    assert saved == dict(base_config, pre_seq_len=PRE_SEQ_LEN, prefix_projection=projection), saved
    save_file(state, workdir / "model.safetensors", metadata={"format": "pt"})
    with contextlib.redirect_stdout(sys.stderr):
        model = model_cls.from_pretrained(workdir)
    model = model.float().eval()
    loaded = model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    return model, prefix


@contextlib.contextmanager
def spliced_image(model, images, pre: int, expected_embeds):
    """Upstream's image path with a prefix raises (see check_image_path_bug); this gives the text path the
    embeddings the image path computes: a forward hook on `transformer.word_embeddings` replaces the 32 placeholder
    rows of the prompt step by upstream's BLIP-2 output (`image_encoder(images)`), as
    `ChatGLMForConditionalGenerationWithImage` builds inputs_embeds; checked equal to the inputs_embeds the
    prefix-free golden recorded."""
    length = base.TINY_CONFIG["image_length"]
    embeds = model.image_encoder(images)

    def hook(module, args, output):
        if output.shape[1] < pre + length:  # a decode step: one new token
            return output
        out = torch.cat([output[:, :pre], embeds.to(output.dtype), output[:, pre + length:]], dim=1)
        if expected_embeds is not None:
            assert torch.equal(out, expected_embeds.expand_as(out)), "spliced embeddings differ from upstream's"
        return out

    handle = model.transformer.word_embeddings.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def check_image_path_bug(model, g0) -> None:
    """The documented reason for `spliced_image`: ChatGLMModel.forward leaves `batch_size` unset when both input_ids
    and inputs_embeds are given (the image path) and only its pre_seq_len branch reads it."""
    pre = int(g0["image.pre_image_length"])
    try:
        model(input_ids=g0["image.input_ids"], images=g0["image.images"], pre_image_length=pre)
    except UnboundLocalError as e:
        assert "batch_size" in str(e), e
        return
    raise AssertionError("upstream's image path now runs with a prefix: drop spliced_image")


def run_variant(model, probe, g0, put) -> None:
    """Forward passes and greedy generation of one variant; g0: the prefix-free goldens (same inputs)."""
    pre = int(g0["image.pre_image_length"])
    batch = {k: g0[f"text_batch.{k}"] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        # left-padded text batch as the tokenizer pads it (mask and 2D positions of the real tokens only)
        probe.calls.clear()
        o = model(**batch, return_dict=True)
        call = probe.calls[-1]
        assert call["past_len"] == PRE_SEQ_LEN  # the prefix is the first layer's past
        put("text_batch.full_attention_mask", call["attention_mask"])  # (B, 1, T, P + T), True = masked
        put("text_batch.position_ids", call["position_ids"])
        put("text_batch.logits", o.logits.float())
        real = batch["attention_mask"].bool()
        moved = (o.logits - g0["text_batch.logits"])[real].abs().max().item()
        assert moved > 0.1, f"the prefix hardly changes the logits ({moved})"
        # one image prompt (BLIP-2 embeddings spliced in) with the prefix
        check_image_path_bug(model, g0)
        with spliced_image(model, g0["image.images"], pre, g0["image.inputs_embeds"]):
            o = model(input_ids=g0["image.input_ids"], return_dict=True)
        put("image.logits", o.logits.float())

        cases = {
            "text": {"input_ids": g0["text.input_ids"], "pre_image_length": 0},  # as chat() calls generate
            "text_batch": dict(batch, pre_image_length=0),  # left-padded: mask and positions given
            "image": {"input_ids": g0["image.input_ids"], "pre_image_length": 0},  # images: spliced_image
        }
        for case, kwargs in cases.items():
            splice = spliced_image(model, g0["image.images"], pre, g0["image.inputs_embeds"]) if case == "image" \
                else contextlib.nullcontext()
            with splice:
                new_ids, logits, steps = base.greedy(model, probe, N_NEW, **kwargs)
            put(f"{case}.gen_ids", new_ids)
            put(f"{case}.gen_logits", logits)  # raw logits of each step: [batch, 5, vocab]
            put(f"{case}.gen_step_position_ids", torch.cat([s["position_ids"] for s in steps[1:]], dim=2))
            put(f"{case}.gen_step_past_len", torch.tensor([s["past_len"] for s in steps[1:]]))  # P + own tokens
            assert steps[0]["past_len"] == PRE_SEQ_LEN


def fp64_noise(model, g0, golden, variant: str) -> float:
    """Largest |fp32 - fp64| logit difference of the same upstream model (text batch real tokens, image)."""
    m64 = copy.deepcopy(model).double()
    pre = int(g0["image.pre_image_length"])
    with torch.no_grad():
        o = m64(input_ids=g0["text_batch.input_ids"], attention_mask=g0["text_batch.attention_mask"],
                position_ids=g0["text_batch.position_ids"], return_dict=True)
        real = g0["text_batch.attention_mask"].bool()
        a = (o.logits - golden[f"{variant}.text_batch.logits"].double())[real].abs().max().item()
        with spliced_image(m64, g0["image.images"].double(), pre, None):
            o = m64(input_ids=g0["image.input_ids"])
        b = (o.logits - golden[f"{variant}.image.logits"].double()).abs().max().item()
    return max(a, b)


def run(args) -> None:
    import transformers
    from safetensors.torch import load_file, save_file

    stubbed = base.stub_torchvision()
    upstream = Path(args.upstream).resolve()
    base_dir = Path(args.base) if Path(args.base).is_absolute() else base.REPO_ROOT / args.base
    out = Path(args.out) if Path(args.out).is_absolute() else base.REPO_ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    configuration, modeling, visual = base.load_upstream(upstream)
    base.patch_glm_proj(visual)
    model_cls = modeling.ChatGLMForConditionalGenerationWithImage
    base_state = load_file(str(base_dir / "model.safetensors"))
    base_config = json.loads((base_dir / "config.json").read_text())
    g0 = load_file(str(base_dir / "golden.safetensors"))
    base_sha = base.sha256(base_dir / "model.safetensors")

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(args.seed + 100)
    golden: dict[str, torch.Tensor] = {}
    noise = {}
    for variant, projection in VARIANTS.items():
        with tempfile.TemporaryDirectory() as tmp:
            model, prefix = build_variant(configuration, model_cls, base_state, base_config, projection, gen,
                                          Path(tmp))
        for name, tensor in prefix.items():
            golden[f"{variant}.weights.{name}"] = tensor.contiguous()
        probe = base.Probe(model)

        def put(name, tensor, variant=variant):
            golden[f"{variant}.{name}"] = tensor.detach().contiguous().clone()

        run_variant(model, probe, g0, put)
        noise[variant] = fp64_noise(model, g0, golden, variant)

    metadata = {"format": "pt", "pre_seq_len": str(PRE_SEQ_LEN), "base_model_sha256": base_sha}
    save_file(golden, out / "golden.safetensors", metadata=metadata)
    write_source(out, upstream, golden, args, stubbed, base_sha, noise, transformers.__version__)
    print(f"wrote {out} ({(out / 'golden.safetensors').stat().st_size / 1024:.0f} KiB golden.safetensors)")
    for name, t in golden.items():
        print(f"  {name:60s} {str(t.dtype):14s} {tuple(t.shape)}")
    print(f"fp32 vs fp64 upstream, max |logits diff|: {noise}")


def write_source(out: Path, upstream: Path, golden, args, stubbed, base_sha, noise, tf_version) -> None:
    rows = "\n".join(f"| {name} | {base.sha256(upstream / name)} |" for name in base.PROVENANCE)
    golden_rows = "\n".join(
        f"| `{k}` | {str(v.dtype).removeprefix('torch.')} | {tuple(v.shape)} |" for k, v in golden.items()
    )
    noise_rows = "; ".join(f"{k} {v:.1e}" for k, v in noise.items())
    torchvision = "stubbed, as for the sibling goldens" if stubbed else "importable (not used)"
    text = f"""# ChatGLM-6B / VisualGLM-6B P-tuning v2 golden tensors: provenance

Produced by the **upstream** remote code (the files, environment and tiny model of `../visualglm/SOURCE.md`) with
`pre_seq_len` = {PRE_SEQ_LEN} set, by `scripts/make_visualglm_ptuning_golden.py`. The upstream code is not in this
repository.

## Regenerate

```bash
/work/venv-visualglm/bin/python scripts/make_visualglm_golden.py --upstream /work/upstream/visualglm
/work/venv-visualglm/bin/python scripts/make_visualglm_ptuning_golden.py --upstream {upstream}
```

Environment: Python {sys.version.split()[0]}, torch {torch.__version__}, transformers {tf_version}, CPU, fp32,
seed {args.seed} (prefix weights from `torch.Generator().manual_seed({args.seed + 100})`); torchvision {torchvision}.

| upstream file | sha256 of the file used |
|---|---|
{rows}

## Model

- Base: `../visualglm/model.safetensors`, sha256
  `{base_sha}`
  (also in this file's safetensors metadata; the test checks it, so regenerate both together), and
  `../visualglm/config.json` with `pre_seq_len` {PRE_SEQ_LEN} and `prefix_projection` false (`plain`) or true
  (`projection`): exactly what upstream `save_pretrained` wrote (checked).
- Prefix weights (`{{variant}}.weights.*`, upstream names): `plain`: `transformer.prefix_encoder.embedding.weight`
  ({PRE_SEQ_LEN}, num_layers x 2 x hidden = 256); `projection`: `embedding.weight` ({PRE_SEQ_LEN}, hidden 64),
  `trans.0` Linear(64, 64), Tanh, `trans.2` Linear(64, 256). Embedding N(0,1), Linear weights N(0,1)/sqrt(fan_in),
  biases 0.1 N(0,1), rounded to fp16-representable values like the base.
- Loading path: build with the prefix, load the base weights, draw the prefix, save config.json + one
  model.safetensors with **every** tensor (base + prefix, the full official layout of a P-tuning model) to a
  temporary folder, `ChatGLMForConditionalGenerationWithImage.from_pretrained` it (GLM part fp16, prefix encoder
  fp32), `.float()`, eval mode (the prefix dropout 0.1 of `get_prompt` is then inactive).

## golden.safetensors

Per variant, the inputs of `../visualglm/golden.safetensors` (same ids, padding, positions, images):
- `text_batch.logits`: the left-padded batch (input_ids, 2D attention_mask, position_ids given);
  `text_batch.full_attention_mask` what the first GLM layer got: (batch, 1, T, {PRE_SEQ_LEN} + T), True = masked, the
  {PRE_SEQ_LEN} prefix columns first and never masked; `text_batch.position_ids` the positions it got (= the
  prefix-free ones: the prefix does not shift them).
- `image.logits`: the one-image prompt with the prefix. **Deviation:** upstream's image path cannot run with a
  prefix: `ChatGLMModel.forward` leaves `batch_size` unset when both input_ids and inputs_embeds are given (the
  image path passes both) and only its pre_seq_len branch reads it, so image + prefix raises UnboundLocalError
  (the script asserts it still does). The image case therefore runs the text path (`input_ids` only) with a
  forward hook on `transformer.word_embeddings` that, on the prompt step, replaces the 32 placeholder rows by
  upstream's `image_encoder(images)`: exactly the inputs_embeds the image path builds (asserted equal to
  `image.inputs_embeds` of the prefix-free goldens); later steps embed their one token as usual.
- `{{text,text_batch,image}}.gen_*`: `model.generate`, greedy, {N_NEW} new tokens, no EOS stop, KV cache (`text`,
  `image` as `chat()` calls it; `text_batch` with mask and positions); `gen_logits` the raw logits of every step,
  `gen_step_position_ids` the positions of the 4 decode steps, `gen_step_past_len` their KV length = {PRE_SEQ_LEN}
  + the tokens so far (the prompt step's past is the prefix alone).

Numerical noise: the same upstream model in float64 differs from these fp32 logits by at most
{noise_rows}.

| tensor | dtype | shape |
|---|---|---|
{golden_rows}

## Upstream behaviour these tensors pin (observed by running it)

- `get_prompt`: rows = `embedding(arange(P))` (through `trans` with projection), viewed (batch, P, 2 x layers,
  heads, head_dim), permuted to per-layer (key, value) of shape (P, batch, heads, head_dim): row p holds [layer 0
  key | layer 0 value | layer 1 key | ...]. They are the layers' `layer_past`: concatenated before the tokens' own
  keys/values (after the tokens' RoPE; the prefix keys are never rotated) and returned in the cache.
- Mask: the prefix-LM mask of the tokens (from `<sop>`, with padding rows and columns masked) gets P leading
  columns that no query masks; decode steps mask nothing but padding columns, plus the P visible columns.
- Position and block-position ids are those of the prompt without a prefix, in the prompt and in every decode step.
"""
    (out / "SOURCE.md").write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", required=True, help="folder with the upstream VisualGLM remote code files")
    parser.add_argument("--base", default="tests/golden/visualglm", help="the prefix-free goldens (sibling script)")
    parser.add_argument("--out", default="tests/golden/visualglm_ptuning", help="output folder (relative to the repo)")
    parser.add_argument("--seed", type=int, default=0)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
