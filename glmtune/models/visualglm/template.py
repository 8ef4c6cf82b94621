"""VisualGLM-6B / ChatGLM-6B prompt format: Sample -> token ids, labels, 2D positions, image tensor.

As upstream's fine-tuning (THUDM/VisualGLM-6B finetune_visualglm.py) and chat():

    <img> + 32 placeholders + </img> + [history: 问：{q}\\n答：{a}\\n] + 问：{q}\\n答：  [gMASK] <sop> answer <eop>

(English conversations use `Q:{q}\\nA:`; the ChatGLM-6B text model uses `[Round i]\\n问：...` with history.)
Everything up to `[gMASK]` is context; the targets are `<sop>`, the answer and `<eop>` (upstream labels from
`<sop>` on). Earlier turns are part of the context text, as upstream folds history into the prompt: only the
last answer of a conversation is learned. A system turn is prepended to the first question.

Positions are 2D (B, 2, T): position = index in the context, and `<sop>` and everything after it keep the
`[gMASK]` index; block position = 0 in the context, then 1, 2, ... from `<sop>`. One image per conversation,
always in front (VisualGLM's format has one image slot).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from glmtune.data.batching import IGNORE, collate_columns, collate_packed
from glmtune.data.sample import IMAGE_PLACEHOLDER, SampleError, Turn
from glmtune.models.image_transforms import clip_image_tensor
from glmtune.models.visualglm.config import load_config
from glmtune.models.visualglm.tokenizer import ChatGLMTokenizer, build_prompt

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


class ChatGLMProcessor:
    def __init__(self, path: str | Path):
        self.tokenizer = ChatGLMTokenizer.from_pretrained(path)
        self.cfg = load_config(path)
        t = self.tokenizer
        self.gmask, self.sop, self.eop = t.gmask_token_id, t.bos_token_id, t.eos_token_id
        self.pad_id = t.pad_token_id
        self.image_start = len(t.encode_text("<img>"))  # upstream's pre_image
        self.language = None  # "en" / "zh" forces VisualGLM-6B's prompt language (chat --english); None: from the text

    def _prompt(self, turns: list[Turn], has_image: bool, source: str) -> tuple[str, str | None]:
        """(prompt text, last answer or None)."""
        roles = [t.role for t in turns]
        texts = [t.text.replace(IMAGE_PLACEHOLDER, "") for t in turns]
        if roles[0] == "system":  # no system slot upstream: it leads the first question
            roles.pop(0)
            system = texts.pop(0)
            texts[0] = f"{system}\n{texts[0]}"
        answer = texts.pop() if roles[-1] == "assistant" else None
        pairs = [(texts[i], texts[i + 1]) for i in range(0, len(texts) - 1, 2)]
        query = texts[-1]
        if self.cfg.eva_config is None:  # ChatGLM-6B text model
            return build_prompt(query, pairs, style="chatglm"), answer
        lang = self.language or ("zh" if any(_CJK.search(x) for x in texts) else "en")
        return build_prompt(query, pairs, lang, image=has_image, image_length=self.cfg.image_length), answer

    def encode(self, turns: list[Turn], images: list, source: str = "", max_length: int | None = None,
               generation: bool = False) -> dict:
        if len(images) > 1:
            raise SampleError(source, f"{len(images)} images: VisualGLM-6B takes one image per conversation")
        if images and self.cfg.eva_config is None:
            raise SampleError(source, "this checkpoint has no image encoder (ChatGLM-6B text model) but the "
                                      "sample has an image; use a VisualGLM-6B checkpoint or text-only data")
        prompt, answer = self._prompt(turns, bool(images), source)
        context = self.tokenizer.encode(prompt, add_special_tokens=False) + [self.gmask]
        target = [] if generation else self.tokenizer.encode_text(answer) + [self.eop]
        ids = context + [self.sop] + target
        n_ctx = len(context)
        if max_length is not None and len(ids) > max_length:
            if generation or n_ctx + 2 > max_length:
                raise SampleError(source, f"{len(ids)} tokens exceed data.max_length={max_length} and the prompt "
                                          f"({n_ctx} tokens incl. the image) leaves no room for the answer; raise "
                                          f"data.max_length or shorten it")
            ids = ids[:max_length]
        T = len(ids)
        gmask_pos = n_ctx - 1
        positions = [min(i, gmask_pos) for i in range(T)]
        blocks = [0] * n_ctx + list(range(1, T - n_ctx + 1))
        input_ids = torch.tensor(ids, dtype=torch.long)
        image_mask = torch.zeros(T, dtype=torch.bool)
        out = {"input_ids": input_ids, "position_ids": torch.tensor([positions, blocks], dtype=torch.long),
               "image_mask": image_mask}
        if images:
            image_mask[self.image_start:self.image_start + self.cfg.image_length] = True
            out["images"] = clip_image_tensor(images[0], self.cfg.eva_config.image_size[0])[None]
        if not generation:
            labels = torch.full_like(input_ids, IGNORE)
            labels[n_ctx:] = input_ids[n_ctx:]  # <sop>, the answer, <eop>
            out["labels"] = labels
            out["truncated"] = T < len(context) + 1 + len(target)
        return out

    def token_count(self, turns: list[Turn], image_sizes: list[tuple[int, int]]) -> int:
        """Length of `encode` (untruncated) without the pixels, for token budgets: context + [gMASK], <sop>,
        answer, <eop>."""
        prompt, answer = self._prompt(turns, bool(image_sizes), "")
        return len(self.tokenizer.encode(prompt, add_special_tokens=False)) + 2 + \
            len(self.tokenizer.encode_text(answer)) + 1

    def collate_packed(self, items: list[dict], max_length: int) -> dict:
        """Pack `encode` outputs into rows of at most `max_length` tokens: each sample keeps its 2-D (position,
        block) ids restarting at 0; the model gives each sample its own prefix-LM mask. No attention mask."""
        fills = {"input_ids": self.pad_id, "image_mask": False, "labels": IGNORE}
        batch = collate_packed(items, [x["position_ids"] for x in items], fills, max_length, extra=("images",))
        batch["position_ids"] = batch["position_ids"].transpose(0, 1).contiguous()  # (rows, 2, width)
        return batch

    def collate(self, items: list[dict], pad_left: bool = False) -> dict:
        fills = {"input_ids": self.pad_id, "position_ids": 0, "image_mask": False, "labels": IGNORE}
        return collate_columns(items, fills, pad_left, extra=("images",))

    def decode(self, ids) -> str:
        from glmtune.models.visualglm.tokenizer import process_response

        return process_response(self.tokenizer.decode(ids, skip_special_tokens=True))

    def image_token_count(self, item: dict) -> int:
        return int(item["image_mask"].sum())
