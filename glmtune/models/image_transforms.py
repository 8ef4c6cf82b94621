"""Image transform shared by the native families: square bicubic resize, [0, 1], CLIP mean/std.

GLM-4V-9B (1120 px) and VisualGLM-6B (224 px) both preprocess this way upstream (torchvision Resize with
bicubic interpolation on a PIL image, ToTensor, Normalize); PIL does the same resize without torchvision.
"""

from __future__ import annotations

import numpy as np
import torch

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def clip_image_tensor(image, size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) float tensor."""
    from PIL import Image

    x = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    return torch.from_numpy(((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1).copy())
