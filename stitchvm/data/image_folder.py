"""Image–caption folders in the Hugging Face `imagefolder` layout: images plus `metadata.jsonl` lines
`{"file_name": "0001.png", "text": "a red square"}`. Used as a prompt source and as a source of clean latents."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

METADATA = "metadata.jsonl"


def read_metadata(folder: str | Path) -> list[tuple[str, str]]:
    """(file_name, text) pairs in file order; errors name the folder and the bad line."""
    path = Path(folder) / METADATA
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: an image folder needs {METADATA} with file_name and text")
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "file_name" not in row or "text" not in row:
            raise ValueError(f"{path}:{n}: needs keys file_name and text, got {sorted(row)}")
        pairs.append((row["file_name"], str(row["text"])))
    return pairs


def images_by_text(folder: str | Path) -> dict[str, list[str]]:
    """{caption: sorted file names}."""
    out: dict[str, list[str]] = {}
    for name, text in read_metadata(folder):
        out.setdefault(text, []).append(name)
    return {text: sorted(names) for text, names in out.items()}


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """(3, size, size) pixels in [-1, 1]: shorter side resized to `size` (bicubic, antialiased), centre-cropped."""
    from PIL import Image

    with Image.open(path) as im:
        x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top:top + size, left:left + size].clamp(-1, 1)
