"""Generation shared by chat, eval, predict and serve: one decode loop with the KV cache, greedy or sampling.

A step turns the last logits into one token per row: the repetition penalty (greedy too, as transformers), then,
when sampling (temperature > 0), temperature, top-k and top-p, and a draw from a `torch.Generator` seeded by
`seed`. `decode_steps` yields each step's tokens (B,) as they are made: streaming is iterating it. The native
families supply only their position rule (`next_positions`); GLM-4.1V runs transformers' own generate with the
same token rule as a logits processor (`hf_generate_steps`), so both give the same tokens for the same logits.
Greedy decoding without a repetition penalty takes the argmax of the raw logits, bit for bit the former path.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from glmtune.config import RecipeError


@dataclass(frozen=True)
class GenerationOptions:
    """How to pick tokens. temperature 0 = greedy (the default); stop_ids end a row like the model's eos ids."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: a fresh random seed per call
    stop_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        checks = [
            (self.max_new_tokens >= 1, "--max-new-tokens", "must be at least 1"),
            (self.temperature >= 0, "--temperature", "must be >= 0 (0 = greedy)"),
            (0 < self.top_p <= 1, "--top-p", "must be in (0, 1]"),
            (self.top_k >= 0, "--top-k", "must be >= 0 (0 = off)"),
            (self.repetition_penalty > 0, "--repetition-penalty", "must be > 0 (1 = off)"),
        ]
        for ok, flag, why in checks:
            if not ok:
                raise RecipeError(f"{flag} {getattr(self, flag[2:].replace('-', '_'))}: {why}")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


def make_generator(options: GenerationOptions, device) -> torch.Generator | None:
    if not options.sampling:
        return None
    g = torch.Generator(device=device)
    if options.seed is None:
        g.seed()
    else:
        g.manual_seed(options.seed)
    return g


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as transformers applies it: a seen token's logit is divided by `penalty` if positive,
    multiplied if negative. `seen` (B, V) bool."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the most probable tokens until their probability reaches p (at least one), -inf elsewhere."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass of the tokens ranked above each one
    drop_sorted = before >= p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(logits: torch.Tensor, seen: torch.Tensor | None, options: GenerationOptions,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from the last logits (B, V), in fp32 for the sampling arithmetic."""
    if options.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, options.repetition_penalty)
    if not options.sampling:
        return logits.argmax(-1)
    logits = filter_top_p(filter_top_k(logits.float() / options.temperature, options.top_k), options.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def seen_tokens(input_ids: torch.Tensor, vocab: int, pad_id: int) -> torch.Tensor:
    """(B, V) bool: the tokens in `input_ids` for the repetition penalty; the padding id never counts."""
    seen = torch.zeros(len(input_ids), vocab, dtype=torch.bool, device=input_ids.device)
    seen.scatter_(1, input_ids.clamp(0, vocab - 1), True)
    if 0 <= pad_id < vocab:
        seen[:, pad_id] = False
    return seen


@torch.no_grad()
def decode_steps(model, batch: dict, options: GenerationOptions, eos: list[int], pad_id: int,
                 next_positions: Callable[[torch.Tensor], torch.Tensor],
                 last_positions: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield the new tokens (B,) of each step, `pad_id` in rows that have stopped, up to max_new_tokens.

    The prompt runs once; every step then feeds one token with the positions `next_positions(previous)`
    (each family's rule: GLM-4 counts on in the unexpanded prompt, ChatGLM-6B keeps the [gMASK] position
    and counts the block position), starting from `last_positions`, the prompt's last positions.
    """
    out = model(**batch, use_cache=True)
    past, mask, pos = out.past_key_values, batch["attention_mask"], last_positions
    done = torch.zeros(len(mask), dtype=torch.bool, device=mask.device)
    stop = torch.tensor(list(eos) + list(options.stop_ids), device=mask.device)
    generator = make_generator(options, mask.device)
    vocab = out.logits.shape[-1]
    seen = seen_tokens(batch["input_ids"], vocab, pad_id) if options.repetition_penalty != 1.0 else None
    for step in range(options.max_new_tokens):
        token = next_tokens(out.logits[:, -1], seen, options, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        yield token
        done |= torch.isin(token, stop)
        if bool(done.all()) or step == options.max_new_tokens - 1:
            break
        if seen is not None:
            seen[torch.arange(len(token)), token] = True
        pos = next_positions(pos)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=token[:, None], position_ids=pos, attention_mask=mask, past_key_values=past,
                    use_cache=True)
        past = out.past_key_values


def collect(steps: Iterator[torch.Tensor]) -> torch.Tensor:
    """All steps of a decode as (B, new tokens)."""
    return torch.stack(list(steps), dim=1)


class _TokenRule:
    """transformers logits processor that makes the token choice of `next_tokens` (penalty, sampling with our
    generator) and leaves only that token finite, so transformers' greedy search takes exactly it."""

    def __init__(self, options: GenerationOptions, pad_id: int, device):
        self.options, self.pad_id = options, pad_id
        self.generator = make_generator(options, device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen = None
        if self.options.repetition_penalty != 1.0:
            seen = seen_tokens(input_ids, scores.shape[-1], self.pad_id)
        token = next_tokens(scores, seen, self.options, self.generator)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(1, token[:, None], 0.0)


class _QueueStreamer:
    """transformers streamer handing each step's tokens to the consuming generator (the prompt is skipped)."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False
        self.cancelled = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.queue.put(value)

    def end(self):
        self.queue.put(None)


def hf_generate_steps(model, batch: dict, options: GenerationOptions, eos: list[int],
                      pad_id: int) -> Iterator[torch.Tensor]:
    """The same steps through transformers' generate (GLM-4.1V: its M-RoPE positions and cache handling).

    Plain greedy calls generate as before; otherwise `_TokenRule` picks the tokens. generate runs in a thread
    that feeds a queue, so the steps stream; closing the iterator early stops it at the next step."""
    from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    streamer = _QueueStreamer()

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), streamer.cancelled, dtype=torch.bool, device=input_ids.device)

    kwargs = dict(max_new_tokens=options.max_new_tokens, do_sample=False, pad_token_id=pad_id,
                  eos_token_id=list(eos) + list(options.stop_ids), streamer=streamer,
                  stopping_criteria=StoppingCriteriaList([Cancelled()]))
    if options.sampling or options.repetition_penalty != 1.0:
        device = batch["input_ids"].device
        kwargs["logits_processor"] = LogitsProcessorList([_TokenRule(options, pad_id, device)])
    errors: list[BaseException] = []

    def run():
        try:
            model.generate(**batch, **kwargs)
        except BaseException as e:  # re-raised in the consumer
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        while (tokens := streamer.queue.get()) is not None:
            yield tokens.to(batch["input_ids"].device)
    finally:
        streamer.cancelled = True
        thread.join()
    if errors:
        raise errors[0]


# ---- text level: conversations in, answers out (chat, eval, predict, serve) ----

def encode_batch(processor, model, conversations: list[tuple[list, list]]) -> dict:
    """Left-padded prompt batch for (turns ending with a user turn, PIL images) pairs, on the model's device."""
    items = [processor.encode(turns, images, generation=True) for turns, images in conversations]
    batch = processor.collate(items, pad_left=True)
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def stop_ids(family, model, options: GenerationOptions) -> list[int]:
    """The model's eos ids plus the options' stop ids."""
    return list(family.generation_eos(_base(model))) + list(options.stop_ids)


def until_stop(row: list[int], stops: list[int]) -> list[int]:
    """A row's tokens before its first stop token (the padding after it included)."""
    for i, t in enumerate(row):
        if t in stops:
            return row[:i]
    return row


def generate_text(family, model, processor, conversations: list[tuple[list, list]],
                  options: GenerationOptions) -> list[str]:
    """Answers for a batch of conversations (batched with left padding and the KV cache)."""
    batch = encode_batch(processor, model, conversations)
    stops = stop_ids(family, model, options)
    new = collect(family.stream(model, batch, options, family.generation_eos(_base(model)), processor.pad_id))
    return [processor.decode(until_stop(row.tolist(), stops)).strip() for row in new]


def stream_text(family, model, processor, conversation: tuple[list, list],
                options: GenerationOptions) -> Iterator[str]:
    """One answer as text pieces while it is generated; the pieces join to `generate_text`'s answer.

    Each step decodes all tokens so far and hands out what was added, holding back the last character and
    any trailing U+FFFD (a multi-byte character not complete yet, or punctuation that ChatGLM-6B's
    post-processing rewrites depending on its neighbour) until the next step or the end."""
    batch = encode_batch(processor, model, [conversation])
    stops, ids, sent = stop_ids(family, model, options), [], ""
    for token in family.stream(model, batch, options, family.generation_eos(_base(model)), processor.pad_id):
        t = int(token[0])
        if t in stops:
            break
        ids.append(t)
        text = processor.decode(ids).strip().rstrip("\ufffd")[:-1]
        if len(text) > len(sent) and text.startswith(sent):
            yield text[len(sent):]
            sent = text
    final = processor.decode(ids).strip()
    if len(final) > len(sent) and final.startswith(sent):
        yield final[len(sent):]


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model
