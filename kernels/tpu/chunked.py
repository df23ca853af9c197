"""The chunked Mosaic TPU kernels' public surface, named like `gdn_jax.kernels.chunked`:
`supports`, `chunked_forward` (chunked_forward.py) and `chunked_backward`
(chunked_backward.py); the per-chunk maths is chunk_math.py."""
from __future__ import annotations

from .chunk_math import CHUNK
from .chunked_backward import chunked_backward
from .chunked_forward import HEAD_SIZES, chunked_forward, supports

__all__ = ["supports", "chunked_forward", "chunked_backward", "CHUNK", "HEAD_SIZES"]
