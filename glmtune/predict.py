"""`glmtune predict`: batch inference over a data file into a jsonl, resumable after a kill.

Each record of the data file (any supported format) becomes one line of the output, in file order:
`{"source": "file:line", "question", "prediction", "reference"}`, the question being the last user turn and the
reference the record's last answer (null if empty: a record with an empty answer is only a question). A
bad record with `on_bad_sample="skip"` becomes `{"source", "error"}`. Lines are appended and flushed batch by
batch; a second run with the same output skips every source already written (a half-written last line,
from a kill in mid-write, is cut off first), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from glmtune.chat import load_for_inference, set_english
from glmtune.data.formats import iter_records
from glmtune.data.sample import SampleError
from glmtune.data.stream import image_base, load_sample
from glmtune.generation import GenerationOptions, generate_text


def done_sources(out: Path) -> set[str]:
    """Sources of the complete lines already in `out`; a trailing partial line is truncated away."""
    if not out.is_file():
        return set()
    raw = out.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):  # killed in the middle of a write
        with open(out, "r+b") as f:
            f.truncate(end)
    done = set()
    for number, line in enumerate(raw[:end].splitlines(), start=1):
        try:
            done.add(json.loads(line)["source"])
        except (ValueError, KeyError, TypeError):
            raise SampleError(f"{out}:{number}", "not a line written by glmtune predict; pass another --out "
                                                 "or delete the file") from None
    return done


def predict(target: str | Path, data: str | Path, out: str | Path, adapter=None, batch_size: int = 8,
            data_format: str = "auto", image_dir: str | None = None, on_bad_sample: str = "error",
            max_samples: int | None = None, options: GenerationOptions | None = None, quant: int | None = None,
            english: bool = False, print_fn=print) -> dict:
    """Write predictions for `data` to `out` (appending to what is there). With sampling and a seed, each
    batch draws from seed + the index of its first record, so a run is reproducible batch by batch."""
    from glmtune.evaluate import data_defaults

    data, out = Path(data), Path(out)
    if not data.is_file():
        raise FileNotFoundError(f"--data {data}: file not found")
    options = options or GenerationOptions()
    defaults = data_defaults(target)
    data_format = data_format if data_format != "auto" else defaults["format"]
    image_dir = image_dir or defaults["image_dir"]
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_sources(out)
    family, model, processor = load_for_inference(target, adapter, quant=quant)
    set_english(family, processor, english)
    base = image_base(data, image_dir)
    counts = {"written": 0, "already_done": 0, "skipped": 0}

    with open(out, "a", encoding="utf-8") as f:
        def write(lines: list[dict]) -> None:
            f.write("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
            f.flush()
            os.fsync(f.fileno())

        pending: list[tuple[int, object, list]] = []

        def flush() -> None:
            batch_options = options
            if options.seed is not None:
                batch_options = replace(options, seed=options.seed + pending[0][0])
            answers = generate_text(family, model, processor, [(s.turns[:-1], imgs) for _, s, imgs in pending],
                                    batch_options)
            write([{"source": s.source, "question": s.turns[-2].text, "prediction": answer,
                    "reference": s.turns[-1].text or None} for (_, s, _), answer in zip(pending, answers)])
            counts["written"] += len(pending)
            pending.clear()

        for index, (source, record) in enumerate(iter_records(data)):
            if max_samples is not None and index >= max_samples:
                break
            if source in done:
                counts["already_done"] += 1
                continue
            try:
                sample, images = load_sample(source, record, base, data_format)
            except SampleError as e:
                if on_bad_sample == "error":
                    raise
                write([{"source": e.source, "error": e.reason}])
                counts["skipped"] += 1
                continue
            pending.append((index, sample, images))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    print_fn(f"predict: {counts['written']} predictions written, {counts['already_done']} already in {out}, "
             f"{counts['skipped']} bad records skipped")
    return {**counts, "path": str(out)}
