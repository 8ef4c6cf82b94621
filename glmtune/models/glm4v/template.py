"""GLM-4 / GLM-4V chat format: Sample -> token ids, labels, positions, image tensor.

Layout (upstream `apply_chat_template`, tokenised piece by piece):

    [gMASK]<sop> {<|system|> "\n" text} <|user|> "\n" [<|begin_of_image|><|endoftext|><|end_of_image|>] question
    <|assistant|> "\n" answer <|user|> ...

Targets follow the official text fine-tuning demo (GLM-4 finetune_demo/finetune.py @ a3e59fb, whose label
shift makes them): the "\n" after `<|assistant|>` (upstream generation prompts end at `<|assistant|>` and
the model writes the metadata line), the answer, and the token after each answer (the next `<|user|>`, or a
final `<|user|>` = eos 151336). The official vision demo labels the same tokens without the shift and never
learns to stop; glmtune learns the stop token for GLM-4V too.

The image span is expanded here to boi + num_patches + eoi positions (`image_mask`), and positions count
in the unexpanded prompt: boi keeps its index, every patch gets boi+1, eoi and the text after keep their
original indices, as the upstream model computes them. One image per conversation, as upstream.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glmtune.data.batching import IGNORE, collate_columns, collate_packed, cut_to_length
from glmtune.data.sample import IMAGE_PLACEHOLDER, SampleError, Turn
from glmtune.models.glm4v.config import load_config
from glmtune.models.glm4v.tokenizer import Glm4Tokenizer
from glmtune.models.image_transforms import clip_image_tensor


class Glm4Processor:
    """Tokenizer + image transform of one checkpoint folder (GLM-4V-9B, or GLM-4-9B-Chat without vision)."""

    def __init__(self, path: str | Path):
        self.tokenizer = Glm4Tokenizer.from_pretrained(path)
        cfg = load_config(path)
        self.vision = cfg.vision_config
        tid = self.tokenizer.convert_tokens_to_ids
        self.ids = {name: tid(tok) for name, tok in {
            "gmask": "[gMASK]", "sop": "<sop>", "system": "<|system|>", "user": "<|user|>",
            "assistant": "<|assistant|>", "boi": "<|begin_of_image|>", "eoi": "<|end_of_image|>",
            "placeholder": "<|endoftext|>",
        }.items()}
        self.pad_id = self.tokenizer.pad_token_id
        self.newline = self.tokenizer.encode("\n")

    def text(self, s: str) -> list[int]:
        return self.tokenizer.encode(s) if s else []

    def image_tensor(self, image) -> torch.Tensor:
        return clip_image_tensor(image, self.vision.image_size)

    def _build(self, turns: list[Turn], has_image: bool, generation: bool):
        """ids, target flags, image flags and positions (unexpanded index of each token)."""
        ids, target, image, pos = [self.ids["gmask"], self.ids["sop"]], [False, False], [False, False], [0, 1]
        n_patches = self.vision.num_patches if has_image else 0

        def add(tokens, tgt=False):
            for t in tokens:
                pos.append(pos[-1] + 1)
            ids.extend(tokens)
            target.extend([tgt] * len(tokens))
            image.extend([False] * len(tokens))

        def add_image():
            start = pos[-1] + 1
            ids.extend([self.ids["boi"]] + [self.ids["placeholder"]] * n_patches + [self.ids["eoi"]])
            pos.extend([start] + [start + 1] * n_patches + [start + 2])
            target.extend([False] * (n_patches + 2))
            image.extend([True] * (n_patches + 2))

        prev = None
        for turn in turns:
            if turn.role == "assistant":
                add([self.ids["assistant"]])
                add(self.newline + self.text(turn.text), tgt=True)
            else:
                add([self.ids[turn.role]], tgt=prev == "assistant")  # ends the previous answer
                add(self.newline)
                for i, part in enumerate(turn.text.split(IMAGE_PLACEHOLDER)):
                    if i > 0:
                        add_image()
                    add(self.text(part))
            prev = turn.role
        if generation:
            add([self.ids["assistant"]])
        else:
            add([self.ids["user"]], tgt=True)  # eos 151336 ends the last answer
        return ids, target, image, pos

    def encode(self, turns: list[Turn], images: list, source: str = "", max_length: int | None = None,
               generation: bool = False) -> dict:
        if len(images) > 1:
            raise SampleError(source, f"{len(images)} images: GLM-4V takes one image per conversation")
        if images and self.vision is None:
            raise SampleError(source, "this checkpoint has no vision tower (GLM-4 text model) but the sample has "
                                      "an image; use a GLM-4V checkpoint or text-only data")
        ids, target, image, pos = self._build(turns, bool(images), generation)
        cols, truncated = cut_to_length({"ids": ids, "target": target, "image": image, "pos": pos}, target, image,
                                        max_length, source, generation)
        input_ids = torch.tensor(cols["ids"], dtype=torch.long)
        out = {"input_ids": input_ids, "position_ids": torch.tensor(cols["pos"], dtype=torch.long),
               "image_mask": torch.tensor(cols["image"], dtype=torch.bool)}
        if images:
            out["images"] = self.image_tensor(images[0])[None]
        if not generation:
            out["labels"] = torch.where(torch.tensor(cols["target"]), input_ids, torch.full_like(input_ids, IGNORE))
            out["truncated"] = truncated
        return out

    def collate(self, items: list[dict], pad_left: bool = False) -> dict:
        fills = {"input_ids": self.pad_id, "position_ids": 0, "image_mask": False, "labels": IGNORE}
        return collate_columns(items, fills, pad_left, extra=("images",))

    def token_count(self, turns: list[Turn], image_sizes: list[tuple[int, int]]) -> int:
        """Length of `encode` (untruncated) without the pixels, for token budgets (an image is always
        2 + num_patches positions)."""
        return len(self._build(turns, bool(image_sizes), False)[0])

    def collate_packed(self, items: list[dict], max_length: int) -> dict:
        """Pack `encode` outputs into rows of at most `max_length` tokens: each sample keeps the 1-D positions it
        has alone (restarting at 0, its image span expanded in place); no attention mask."""
        fills = {"input_ids": self.pad_id, "image_mask": False, "labels": IGNORE}
        batch = collate_packed(items, [x["position_ids"][None] for x in items], fills, max_length, extra=("images",))
        batch["position_ids"] = batch["position_ids"][0]
        return batch

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def image_token_count(self, item: dict) -> int:
        return int(item["image_mask"].sum())
