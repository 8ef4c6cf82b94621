"""The reference for bench_speed.py: what a user would write without glmtune, a plain transformers Trainer + PEFT
LoRA script on a GLM-4.1V checkpoint and GLM-4 messages jsonl (one image per sample). Imports nothing of glmtune.

    python bench/plain_trainer.py MODEL_DIR DATA.jsonl OUT_DIR --steps N [--batch 4 --workers 2 --r 8 --lr 1e-3]

It tokenises the official chat layout with the checkpoint's tokenizer and image processor (answers and the closing
<|user|> are the targets, as glmtune's template does), LoRA r on the language model's linears only, fp32, AdamW,
cosine with 5% warmup. Writes OUT_DIR/timing.json: the wall clock at the end of each optimizer step (the first one
is the time to first step) and the samples it trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import (AutoTokenizer, Glm4vForConditionalGeneration, Trainer, TrainerCallback,
                          TrainingArguments)
from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

IGNORE = -100
LANGUAGE_TARGETS = r"^model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_up_proj|down_proj)$"


class ChatImages(Dataset):
    def __init__(self, path: Path, model_dir: Path, max_length: int):
        self.rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        self.base = path.parent
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.images = Glm4vImageProcessorPil.from_pretrained(str(model_dir))
        self.max_length = max_length

    def __len__(self):
        return len(self.rows)

    def ids(self, token: str) -> list[int]:
        return [self.tok.convert_tokens_to_ids(token)]

    def text(self, s: str) -> list[int]:
        return self.tok.encode(s, add_special_tokens=False)

    def __getitem__(self, i):
        user, assistant = self.rows[i]["messages"]
        image = Image.open(self.base / user["image"]).convert("RGB")
        vision = self.images(images=[image], return_tensors="pt")
        n_image = int(vision["image_grid_thw"].prod()) // self.images.merge_size ** 2
        prompt = (self.ids("[gMASK]") + self.ids("<sop>") + self.ids("<|user|>") + self.text("\n")
                  + self.ids("<|begin_of_image|>") + self.ids("<|image|>") * n_image + self.ids("<|end_of_image|>")
                  + self.text(user["content"]) + self.ids("<|assistant|>") + self.text("\n"))
        answer = self.text(assistant["content"]) + self.ids("<|user|>")
        ids = (prompt + answer)[:self.max_length]
        labels = ([IGNORE] * len(prompt) + answer)[:self.max_length]
        mm = [0] * len(prompt)
        start = prompt.index(self.ids("<|image|>")[0])
        mm[start:start + n_image] = [1] * n_image
        mm = (mm + [0] * len(answer))[:self.max_length]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "mm_token_type_ids": torch.tensor(mm),
                "pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}


def collate(pad_id: int):
    def pad(seqs, value):
        width = max(len(s) for s in seqs)
        return torch.stack([torch.cat([s, torch.full((width - len(s),), value, dtype=s.dtype)]) for s in seqs])

    def fn(items):
        return {"input_ids": pad([x["input_ids"] for x in items], pad_id),
                "labels": pad([x["labels"] for x in items], IGNORE),
                "mm_token_type_ids": pad([x["mm_token_type_ids"] for x in items], 0),
                "attention_mask": pad([torch.ones(len(x["input_ids"]), dtype=torch.long) for x in items], 0),
                "pixel_values": torch.cat([x["pixel_values"] for x in items]),
                "image_grid_thw": torch.cat([x["image_grid_thw"] for x in items])}
    return fn


class StepTimes(TrainerCallback):
    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.time())


def main() -> int:
    from peft import LoraConfig, get_peft_model

    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=2048)
    a = p.parse_args()
    torch.manual_seed(0)
    data = ChatImages(Path(a.data), Path(a.model), a.max_length)
    model = Glm4vForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0,
                                             target_modules=LANGUAGE_TARGETS))
    pad_id = data.tok.pad_token_id if data.tok.pad_token_id is not None else data.ids("<|endoftext|>")[0]
    args = TrainingArguments(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=a.batch,
                             learning_rate=a.lr, lr_scheduler_type="cosine", warmup_steps=max(1, a.steps // 20),
                             weight_decay=0.0, logging_steps=10, save_strategy="no", report_to=[], use_cpu=True,
                             dataloader_num_workers=a.workers, remove_unused_columns=False, disable_tqdm=True,
                             seed=0)
    times = StepTimes()
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate(pad_id), callbacks=[times])
    trainer.train()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "timing.json").write_text(json.dumps({"step_end_times": times.ends, "batch": a.batch,
                                                          "samples": min(a.steps * a.batch, len(data))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
