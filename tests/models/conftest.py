"""Helpers shared by the parity tests of tests/models/."""

from __future__ import annotations

import pytest
import torch


def _trace_generate(generate, model, batch: dict, max_new_tokens: int = 5):
    """Greedy decoding through a family's `generate`, recording what each forward saw and returned.

    Returns the new ids and, to compare with a golden's `gen_*` tensors: `logits` (B, max_new_tokens, V), the
    logits each new token was chosen from; `position_ids` (B, [2,] steps), the positions fed at each decode step;
    `past_len`, the KV-cache length (prefix included) each decode step attended over. greedy_decode also runs the
    last new token, whose logits are unused: that forward is dropped.
    """
    calls = []

    def hook(module, args, kwargs, out):
        past = kwargs.get("past_key_values")
        calls.append((out.logits[:, -1].detach(), kwargs.get("position_ids"), past[0][0].shape[2] if past else 0))

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        new = generate(model, batch, max_new_tokens=max_new_tokens, eos=[], pad_id=model.config.pad_token_id)
    finally:
        handle.remove()
    used = calls[:max_new_tokens]
    decode = used[1:]  # the first call is the prompt
    return new, {"logits": torch.stack([c[0] for c in used], dim=1),
                 "position_ids": torch.cat([c[1] for c in decode], dim=-1),
                 "past_len": [c[2] for c in decode]}


@pytest.fixture
def trace_generate():
    return _trace_generate
