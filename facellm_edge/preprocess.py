"""InternVL image preprocessing in numpy/OpenCV (no torch), driven by the bundle's ``ImageSpec``.

* an aligned face crop of exactly the tile size is only normalised (BGR->RGB, /255, ImageNet mean/std);
* any other image gets InternVL's dynamic tiling, as transformers' ``GotOcr2ImageProcessor`` does with
  ``crop_to_patches``: the grid (columns x rows, min..max tiles) whose aspect ratio is closest to the image's,
  the image resized to that grid and cut into tiles, plus a thumbnail of the whole image when there is more than
  one tile. Resizing uses OpenCV's bicubic filter; transformers uses torchvision's (antialiased) bicubic, so
  tiled pixels differ slightly (mean |diff| ~0.01 in normalised units, ~0.6 grey levels; measured in
  tests/test_preprocess.py). Same grid, same tiles, same order.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from facellm_edge.bundle import ImageSpec


@functools.lru_cache(maxsize=16)
def supported_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (columns, rows) with min_tiles <= columns*rows <= max_tiles, ordered by tile count (stable)."""
    grids = [
        (w, h)
        for w in range(1, max_tiles + 1)
        for h in range(1, max_tiles + 1)
        if min_tiles <= w * h <= max_tiles
    ]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def optimal_grid(height: int, width: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) with the closest aspect ratio; ties go to more tiles while they cover < 2x the image."""
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for grid in supported_grids(min_tiles, max_tiles):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and area > 0.5 * tile * tile * grid[0] * grid[1]:
            best = grid
    return best


@functools.lru_cache(maxsize=8)
def _lookup_table(spec: ImageSpec) -> np.ndarray:
    """[3, 256] float32: RGB channel c, uint8 value v -> (v / 255 - mean[c]) / std[c], computed in float32."""
    v = np.arange(256, dtype=np.float32) * np.float32(1.0 / 255.0)
    return np.stack([(v - np.float32(m)) / np.float32(s) for m, s in zip(spec.mean, spec.std)])


def normalise(tiles_bgr: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """uint8 BGR [N, H, W, 3] -> float32 RGB [N, 3, H, W], rescaled to 0..1 and mean/std normalised.

    A 256-entry table per channel gives the same float32 values as rescale-then-normalise arithmetic, in about
    half the time."""
    lut = _lookup_table(spec)
    out = np.empty((tiles_bgr.shape[0], 3) + tiles_bgr.shape[1:3], dtype=np.float32)
    for c in range(3):  # output RGB channel c comes from BGR channel 2 - c
        np.take(lut[c], tiles_bgr[..., 2 - c], out=out[:, c])
    return out


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)


def crop_to_pixels(crop_bgr: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """One face crop -> ``pixel_values`` [1, 3, S, S] (resized only if it is not already S x S)."""
    return normalise(_resize(crop_bgr, spec.size, spec.size)[None], spec)


def crops_to_pixels(crops_bgr: list[np.ndarray], spec: ImageSpec) -> np.ndarray:
    """Several face crops -> one batch [N, 3, S, S] for a single encoder call."""
    return normalise(np.stack([_resize(c, spec.size, spec.size) for c in crops_bgr]), spec)


def tile_image(image_bgr: np.ndarray, spec: ImageSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """A whole frame -> (``pixel_values`` [tiles(+thumbnail), 3, S, S], (columns, rows))."""
    s = spec.size
    h, w = image_bgr.shape[:2]
    cols, rows = optimal_grid(h, w, s, spec.min_tiles, spec.max_tiles)
    resized = _resize(image_bgr, cols * s, rows * s)
    tiles = [resized[r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(rows) for c in range(cols)]
    if spec.use_thumbnail and len(tiles) != 1:
        tiles.append(_resize(image_bgr, s, s))
    return normalise(np.stack(tiles), spec), (cols, rows)
