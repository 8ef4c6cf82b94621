"""Greedy decoding with the KV cache for the native families (GLM-4.1V uses transformers' generate)."""

from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def greedy_decode(model, batch: dict, max_new_tokens: int, eos: list[int], pad_id: int,
                  next_positions: Callable[[torch.Tensor], torch.Tensor],
                  last_positions: torch.Tensor) -> torch.Tensor:
    """New tokens (B, <= max_new_tokens), `pad_id` after a row's eos.

    The prompt runs once; every step then feeds one token with the positions `next_positions(previous)`
    (each family's rule: GLM-4 counts on in the unexpanded prompt, ChatGLM-6B keeps the [gMASK] position
    and counts the block position), starting from `last_positions`, the prompt's last positions.
    """
    out = model(**batch, use_cache=True)
    past, mask, pos = out.past_key_values, batch["attention_mask"], last_positions
    done = torch.zeros(len(mask), dtype=torch.bool, device=mask.device)
    stop = torch.tensor(eos, device=mask.device)
    new = []
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        new.append(token)
        done |= torch.isin(token, stop)
        if bool(done.all()):
            break
        pos = next_positions(pos)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=token[:, None], position_ids=pos, attention_mask=mask, past_key_values=past,
                    use_cache=True)
        past = out.past_key_values
    return torch.stack(new, dim=1)
