"""InternVL image preprocessing in numpy (no torch), driven by the bundle's ``ImageSpec``.

* an aligned face crop of exactly the tile size is only normalised (BGR->RGB, /255, ImageNet mean/std);
* a whole image follows the checkpoint's processor (``ImageSpec.crop_to_patches``): InternVL's dynamic tiling, as
  transformers' ``GotOcr2ImageProcessor`` does it — the grid (columns x rows, min..max tiles) whose aspect ratio is
  closest to the image's, the image resized to that grid and cut into tiles, plus a thumbnail of the whole image
  when there is more than one tile — or, without it, the image resized to one tile.

Resizing is torchvision's antialiased bicubic on uint8 images (what the processor runs on CPU), reimplemented:
the same filter, support and int16 fixed-point weights, horizontal pass then vertical, each rounded to uint8. The
pixels equal the processor's bit for bit (tests/test_preprocess.py); OpenCV's bicubic, used before, differed by
~0.6 grey levels on average and much more on downscaled fine detail (it does not antialias).
"""

from __future__ import annotations

import functools

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


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (PIL's and torch's antialiased bicubic)."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def _resample_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Source indices [n_out, K], int16-range fixed-point weights [n_out, K] and their precision (bits) for one
    axis, as torch's uint8 antialiased bicubic computes them (the filter widens by the scale when shrinking)."""
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(n_out, dtype=np.float64) + 0.5)
    lo = np.maximum((center - support + 0.5).astype(np.int64), 0)
    hi = np.minimum((center + support + 0.5).astype(np.int64), n_in)
    k = np.arange(int((hi - lo).max()))
    w = np.where(k[None] < (hi - lo)[:, None], _cubic((k[None] + lo[:, None] - center[:, None] + 0.5) * invscale), 0.0)
    w /= w.sum(axis=1, keepdims=True)
    precision = 0
    while precision < 22 and int(0.5 + w.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    v = w * (1 << precision)
    fixed = np.trunc(np.where(v < 0, v - 0.5, v + 0.5)).astype(np.int32)  # C's (int) cast after rounding
    return np.minimum(lo[:, None] + k[None], n_in - 1), fixed, precision


def _resample_axis(image: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    index, weights, precision = _resample_weights(image.shape[axis], n_out)
    shape = [1] * image.ndim
    shape[axis] = n_out
    acc = np.full(image.shape[:axis] + (n_out,) + image.shape[axis + 1:], 1 << (precision - 1), dtype=np.int32)
    for j in range(index.shape[1]):
        acc += np.take(image, index[:, j], axis=axis) * weights[:, j].reshape(shape)
    np.right_shift(acc, precision, out=acc)
    return np.clip(acc, 0, 255).astype(np.uint8)


def resize_bicubic(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 HxWxC -> height x width x C, antialiased bicubic exactly as transformers' processors resize on CPU
    (torchvision ``resize(..., BICUBIC, antialias=True)`` of a uint8 tensor)."""
    out = image
    if image.shape[1] != width:
        out = _resample_axis(out, width, 1)
    if image.shape[0] != height:
        out = _resample_axis(out, height, 0)
    return out


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    return resize_bicubic(image, width, height)


def crop_to_pixels(crop_bgr: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """One face crop -> ``pixel_values`` [1, 3, S, S] (resized only if it is not already S x S)."""
    return normalise(_resize(crop_bgr, spec.size, spec.size)[None], spec)


def crops_to_pixels(crops_bgr: list[np.ndarray], spec: ImageSpec) -> np.ndarray:
    """Several face crops -> one batch [N, 3, S, S] for a single encoder call."""
    return normalise(np.stack([_resize(c, spec.size, spec.size) for c in crops_bgr]), spec)


def tile_image(image_bgr: np.ndarray, spec: ImageSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """A whole frame -> (``pixel_values`` [tiles(+thumbnail), 3, S, S], (columns, rows)), dynamic tiling."""
    s = spec.size
    h, w = image_bgr.shape[:2]
    cols, rows = optimal_grid(h, w, s, spec.min_tiles, spec.max_tiles)
    resized = _resize(image_bgr, cols * s, rows * s)
    tiles = [resized[r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(rows) for c in range(cols)]
    if spec.use_thumbnail and len(tiles) != 1:
        tiles.append(_resize(image_bgr, s, s))
    return normalise(np.stack(tiles), spec), (cols, rows)


def image_to_pixels(image_bgr: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """A whole image -> ``pixel_values`` [tiles, 3, S, S] exactly as the checkpoint's processor makes them: dynamic
    tiling when ``spec.crop_to_patches``, else one resized tile."""
    if spec.crop_to_patches:
        return tile_image(image_bgr, spec)[0]
    return crop_to_pixels(image_bgr, spec)
