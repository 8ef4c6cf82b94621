"""A tiny GLM-4.1V checkpoint laid out like zai-org/GLM-4.1V-9B-Thinking.

Same file names (config.json, generation_config.json, sharded model-0000N-of-0000M.safetensors +
model.safetensors.index.json, tokenizer.json, tokenizer_config.json, chat_template.jinja,
preprocessor_config.json), same config keys and parameter names, only small. The tokenizer is a
byte-level BPE with GLM-4's pre-tokenizer regex, trained offline on a small built-in corpus; the 23
GLM special tokens follow its regular vocabulary in the official order, so every special id sits at
the same offset from the first special token as in the official tokenizer (151329 + k there).
Token ids are written to config.json from that tokenizer; nothing in glmtune hard-codes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from glmtune.models.tiny_corpus import TINY_CORPUS

# Official order of the added tokens (ids 151329..151351 in GLM-4.1V's tokenizer_config.json).
SPECIAL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
    "<|end_of_video|>", "<|image|>", "<|video|>", "<think>", "</think>", "<answer>", "</answer>",
    "<|begin_of_box|>", "<|end_of_box|>", "<|sep|>",
]
# additional_special_tokens of the official tokenizer_config.json: the first 16 added tokens.
ADDITIONAL_SPECIAL = SPECIAL_TOKENS[:16]

# GLM-4's tiktoken pattern (same as cl100k's); the official tokenizer.json pre-tokenizes with it.
GLM4_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The official chat_template.jinja of GLM-4.1V-9B-Thinking (chat format; data, not code).
CHAT_TEMPLATE = """[gMASK]<sop>
{%- for msg in messages %}
    {%- if msg.role == 'system' %}
<|system|>
{{ msg.content }}
    {%- elif msg.role == 'user' %}
<|user|>{{ '\\n' }}

        {%- if msg.content is string %}
{{ msg.content }}
        {%- else %}
            {%- for item in msg.content %}
                {%- if item.type == 'video' or 'video' in item %}
<|begin_of_video|><|video|><|end_of_video|>
                {%- elif item.type == 'image' or 'image' in item %}
<|begin_of_image|><|image|><|end_of_image|>
                {%- elif item.type == 'text' %}
{{ item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
    {%- elif msg.role == 'assistant' %}
        {%- if msg.metadata %}
<|assistant|>{{ msg.metadata }}
{{ msg.content }}
        {%- else %}
<|assistant|>
{{ msg.content }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{% if add_generation_prompt %}<|assistant|>
{% endif %}"""

TINY_BPE_VOCAB = 480

# initializer_range 0.1 (official 0.02): at width 128 a 0.02-init frozen lm_head caps logits near +-2.5,
# so a LoRA could never make a confident prediction; 0.1 behaves more like a trained head.
TINY_TEXT = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5, attention_bias=True,
    hidden_act="silu", attention_dropout=0.0, initializer_range=0.1, use_cache=True,
    # head_dim 32, half of it rotary -> 8 frequency pairs split over (temporal, height, width)
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                     "mrope_section": [2, 3, 3]},
)
TINY_VISION = dict(
    hidden_size=64, depth=2, num_heads=2, intermediate_size=128, out_hidden_size=128,
    image_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
    hidden_act="silu", attention_bias=False, rms_norm_eps=1e-5, initializer_range=0.02,
)
# Pixel budget counts the temporal patch (2 frames per image, as the official processor does):
# every image is resized to about 112x112 -> an 8x8 patch grid -> 4x4 = 16 image tokens.
TINY_IMAGE_PIXELS = 2 * 112 * 112


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_PAT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_BPE_VOCAB, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_CORPUS * 4, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)  # appended after the regular vocabulary, in order
    return tok


def _tokenizer_config(ids: dict[str, int]) -> dict:
    entry = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    return {
        "added_tokens_decoder": {str(ids[t]): {"content": t, **entry} for t in SPECIAL_TOKENS},
        "additional_special_tokens": ADDITIONAL_SPECIAL,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 65536,
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "PreTrainedTokenizer",
    }


def make_tiny(out_dir: str | Path, seed: int = 0, max_shard_size: str = "1MB") -> Path:
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab_size = -(-tok.get_vocab_size() // 64) * 64  # padded like the official 151552

    eos = [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"], ids["</answer>"]]
    text = dict(TINY_TEXT, vocab_size=vocab_size, pad_token_id=ids["<|endoftext|>"], eos_token_id=eos)
    config = Glm4vConfig(
        text_config=text, vision_config=dict(TINY_VISION), tie_word_embeddings=False,
        image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"],
        image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
    )
    config.architectures = ["Glm4vForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(config).eval()
    model.save_pretrained(out, max_shard_size=max_shard_size)  # small shards: the sharded code path is tested

    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(ids), indent=2, ensure_ascii=False))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": TINY_IMAGE_PIXELS, "longest_edge": TINY_IMAGE_PIXELS},
        "do_rescale": True,
        "patch_size": TINY_VISION["patch_size"],
        "temporal_patch_size": TINY_VISION["temporal_patch_size"],
        "merge_size": TINY_VISION["spatial_merge_size"],
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Glm4vImageProcessor",
        "processor_class": "Glm4vProcessor",
    }, indent=4))
    (out / "generation_config.json").write_text(json.dumps({
        "do_sample": False, "eos_token_id": eos, "pad_token_id": ids["<|endoftext|>"],
    }, indent=2))
    return out
