"""glmtune's error types: a leaf module (imports nothing of glmtune) that config, data, models, adapters and the
commands all import, so that no layer imports another just to raise its error.

Every message names the file, line or recipe key at fault and says how to fix it; the CLI prints it on one line.
"""

from __future__ import annotations


class RecipeError(ValueError):
    """A recipe problem the user must fix; the message says where and how."""


class CheckpointError(ValueError):
    """A model or checkpoint folder glmtune cannot use (config, tokenizer or weight files); names the file."""


class NonFiniteError(RecipeError):
    """Training produced an inf/nan loss or gradient norm (train.on_nonfinite=error); names the step and the last
    good checkpoint. A RecipeError: the fix is in the recipe (learning rate, data, the policy)."""


class SampleError(ValueError):
    """A bad sample. `source` is "file:line" so that the user can find and fix it."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self):  # data workers send these through pipes
        return type(self), (self.source, self.reason)
