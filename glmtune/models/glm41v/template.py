"""GLM-4.1V chat format: Sample -> token ids, labels, image tensors.

Layout (the official chat_template.jinja, tokenised piece by piece so labels line up exactly):

    [gMASK]<sop> [<|system|> "\n" system] <|user|> "\n" {<|begin_of_image|><|image|>*N<|end_of_image|>} question
    <|assistant|> "\n" answer <|user|> ...

Targets are the answer tokens plus the `<|user|>` that follows each answer: `<|user|>` is one of the
config's eos ids, so the model learns to stop where the official chat format ends a turn. N, the
number of `<|image|>` tokens, is the image's patch grid t*h*w divided by spatial_merge_size^2.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glmtune.data.batching import IGNORE, collate_columns, collate_packed, cut_to_length
from glmtune.data.images import pad_to_aspect_ratio
from glmtune.data.sample import IMAGE_PLACEHOLDER, Turn


class Glm41vProcessor:
    """Tokenizer + image processor of one checkpoint folder; picklable (sent to DataLoader workers)."""

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer
        from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.image_processor = Glm4vImageProcessorPil.from_pretrained(str(path))
        self.merge = self.image_processor.merge_size
        tid = self.tokenizer.convert_tokens_to_ids
        self.ids = {name: tid(tok) for name, tok in {
            "gmask": "[gMASK]", "sop": "<sop>", "system": "<|system|>", "user": "<|user|>",
            "assistant": "<|assistant|>", "boi": "<|begin_of_image|>", "eoi": "<|end_of_image|>",
            "image": "<|image|>", "eos": "<|endoftext|>",
        }.items()}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.ids["eos"]
        self.newline = self.text("\n")

    def text(self, s: str) -> list[int]:
        return self.tokenizer.encode(s, add_special_tokens=False) if s else []

    def images(self, images: list) -> dict:
        if not images:
            return {}
        # the image processor raises on an aspect ratio over 200 (after scaling a short side under 28 px up to 28,
        # which may cut ~4% more): pad such images to 190:1
        images = [pad_to_aspect_ratio(image, 190) for image in images]
        out = self.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def _build(self, turns: list[Turn], image_tokens: list[int], source: str, generation: bool):
        """Token ids, per-token target flags and image flags for a conversation (`image_tokens[i]` placeholders
        for image i)."""
        ids, target, is_image = [self.ids["gmask"], self.ids["sop"]], [False, False], [False, False]
        n_images = 0

        def add(tokens, tgt=False, img=False):
            ids.extend(tokens)
            target.extend([tgt] * len(tokens))
            is_image.extend([img] * len(tokens))

        prev = None
        for turn in turns:
            if turn.role == "system":
                add([self.ids["system"]] + self.newline + self.text(turn.text))
            elif turn.role == "user":
                add([self.ids["user"]], tgt=prev == "assistant")  # ends the previous answer
                add(self.newline)
                parts = turn.text.split(IMAGE_PLACEHOLDER)
                for i, part in enumerate(parts):
                    if i > 0:
                        add([self.ids["boi"]])
                        add([self.ids["image"]] * image_tokens[n_images], img=True)
                        add([self.ids["eoi"]])
                        n_images += 1
                    add(self.text(part))
            else:  # assistant
                add([self.ids["assistant"]] + self.newline)
                add(self.text(turn.text), tgt=True)
            prev = turn.role
        if generation:
            add([self.ids["assistant"]] + self.newline)
        else:
            add([self.ids["user"]], tgt=True)  # end of the last answer
        return ids, target, is_image

    def encode(self, turns: list[Turn], images: list, source: str = "", max_length: int | None = None,
               generation: bool = False) -> dict:
        """Model inputs for one conversation. With `generation`, ends with the assistant prompt and has no labels.

        A conversation longer than `max_length` is truncated only if the cut falls after the last image
        token and keeps at least one target; otherwise it is a SampleError (the caller's bad-sample policy).
        """
        vision = self.images(images)
        grids = vision["image_grid_thw"].tolist() if vision else []
        ids, target, is_image = self._build(turns, [t * h * w // self.merge**2 for t, h, w in grids], source,
                                            generation)
        cols, truncated = cut_to_length({"ids": ids, "target": target, "image": is_image}, target, is_image,
                                        max_length, source, generation)
        input_ids = torch.tensor(cols["ids"], dtype=torch.long)
        out = {"input_ids": input_ids, "mm_token_type_ids": torch.tensor(cols["image"], dtype=torch.int32),
               **vision}
        if not generation:
            out["labels"] = torch.where(torch.tensor(cols["target"]), input_ids, torch.full_like(input_ids, IGNORE))
            out["truncated"] = truncated
        return out

    def collate(self, items: list[dict], pad_left: bool = False) -> dict:
        """Pad a list of `encode` outputs into one batch (right padding for training, left for generation)."""
        fills = {"input_ids": self.pad_id, "mm_token_type_ids": 0, "labels": IGNORE}
        return collate_columns(items, fills, pad_left, extra=("pixel_values", "image_grid_thw"))

    def token_count(self, turns: list[Turn], image_sizes: list[tuple[int, int]]) -> int:
        """Length of `encode` (untruncated) from the images' (width, height) alone, for token budgets: the image
        processor's own resize rule gives each image's patch count."""
        patches = [self.image_processor.get_number_of_image_patches(h, w) for w, h in image_sizes]
        return len(self._build(turns, [n // self.merge**2 for n in patches], "", False)[0])

    def positions(self, item: dict) -> torch.Tensor:
        """(4, n) position ids of one `encode` output as the model numbers that sample alone: row 0 the sequence
        position, rows 1-3 the M-RoPE (t, h, w) positions from transformers' own `Glm4vModel.get_rope_index`."""
        from transformers.models.glm4v.modeling_glm4v import Glm4vModel

        mrope, _ = Glm4vModel.get_rope_index(_RopeIndexConfig(self.merge), item["input_ids"][None],
                                             item["mm_token_type_ids"][None], item.get("image_grid_thw"))
        return torch.cat([torch.arange(item["input_ids"].shape[-1])[None], mrope[:, 0]])

    def collate_packed(self, items: list[dict], max_length: int) -> dict:
        """Pack `encode` outputs into rows of at most `max_length` tokens; `position_ids` (4, rows, width) is the
        layout transformers reads as packed (sequence positions, then M-RoPE), with no attention mask."""
        fills = {"input_ids": self.pad_id, "mm_token_type_ids": 0, "labels": IGNORE}
        return collate_packed(items, [self.positions(x) for x in items], fills, max_length,
                              extra=("pixel_values", "image_grid_thw"))

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def image_token_count(self, item: dict) -> int:
        """Sequence positions taken by images in an `encode` output (for `glmtune check`)."""
        return int(item["mm_token_type_ids"].sum())


class _RopeIndexConfig:
    """What `Glm4vModel.get_rope_index` reads from the model: the config's spatial merge size and the
    (stateless) vision position helper; lets the data workers run it without a model."""

    def __init__(self, merge: int):
        from types import SimpleNamespace

        from transformers.models.glm4v.modeling_glm4v import Glm4vModel

        self.config = SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=merge))
        self.get_vision_position_ids = lambda *a, **k: Glm4vModel.get_vision_position_ids(self, *a, **k)
