"""The canonical Sample: the contract between raw data formats and model families.

Every parser in `glmtune/data/formats/` turns one raw record into a `Sample`; every family's
`template.py` turns a `Sample` into token ids, image tensors and labels. Formats never see a
tokenizer and families never see a raw record.

Images are marked inside turn text by the literal placeholder `IMAGE_PLACEHOLDER` ("<image>"), in
the order of `Sample.images`. A family template replaces each placeholder by its own image span
(e.g. `<|begin_of_image|><|image|>...<|end_of_image|>` for GLM-4.1V).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from glmtune.errors import SampleError  # noqa: F401  (re-exported)

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")


@dataclass
class Turn:
    role: str  # one of ROLES
    text: str  # may contain IMAGE_PLACEHOLDER markers


@dataclass
class Sample:
    turns: list[Turn]
    images: list[Path] = field(default_factory=list)  # absolute paths, in placeholder order
    source: str = ""  # "file:line", for error messages and the run summary

    def validate(self) -> "Sample":
        """Structural checks shared by every format; raises SampleError naming `source`."""
        if not self.turns:
            raise SampleError(self.source, "sample has no turns")
        roles = [t.role for t in self.turns]
        bad = [r for r in roles if r not in ROLES]
        if bad:
            raise SampleError(self.source, f"unknown role {bad[0]!r}; expected one of {ROLES}")
        body = roles[1:] if roles[0] == "system" else roles
        if "system" in body:
            raise SampleError(self.source, "a system turn may only come first")
        if not body or body[-1] != "assistant":
            raise SampleError(self.source, "the last turn must be an assistant answer (nothing to learn otherwise)")
        expected = ["user", "assistant"] * (len(body) // 2)
        if body != expected:
            raise SampleError(self.source, f"turns must alternate user/assistant, got {body}")
        n_marks = sum(t.text.count(IMAGE_PLACEHOLDER) for t in self.turns)
        if n_marks != len(self.images):
            raise SampleError(
                self.source, f"{n_marks} {IMAGE_PLACEHOLDER} placeholder(s) but {len(self.images)} image(s)"
            )
        if any(IMAGE_PLACEHOLDER in t.text for t in self.turns if t.role != "user"):
            raise SampleError(self.source, f"{IMAGE_PLACEHOLDER} may only appear in user turns")
        return self
