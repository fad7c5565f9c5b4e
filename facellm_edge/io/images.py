"""The one image reader: every user photo the toolkit decodes (ask, run, eval, data build, training) goes through
:func:`read_image`, so each sees the same pixels (OpenCV's decoder, EXIF orientation applied) within the same
decoded-size bound, refused from the header before any pixel is decoded."""

from __future__ import annotations

from pathlib import Path

from facellm_edge.errors import InputError

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: 120 MB as BGR; bigger photos are refused before they are decoded


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding its pixels (Pillow reads the first few KB)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                return im.size
        except Image.DecompressionBombError as exc:  # Pillow's own cap (2 x MAX_IMAGE_PIXELS) refused the header
            raise _TooLarge(2 * (Image.MAX_IMAGE_PIXELS or 0)) from exc
        except (UnidentifiedImageError, SyntaxError, ValueError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:  # the file system's error, not the decoder's
                raise InputError(f"cannot read image {path}: {exc.strerror or exc}") from exc
            raise InputError(f"cannot decode image {path} (empty, damaged or not an image file)") from exc


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.1f}".removesuffix(".0") + " MP"


class _TooLarge(Exception):
    def __init__(self, at_least: int) -> None:
        super().__init__(at_least)
        self.at_least = at_least


def read_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> "np.ndarray":
    """Read an image file as BGR uint8. Missing, unreadable, undecodable, or above ``max_pixels`` (checked on the
    header, before any pixel is decoded; 0 = no limit) -> :class:`~facellm_edge.errors.InputError`."""
    import cv2
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        w, h = image_size(path)
    except _TooLarge as big:
        if max_pixels and max_pixels <= big.at_least:
            raise InputError(f"image {path} has more than {_mp(big.at_least)}, above the {_mp(max_pixels)} limit; "
                             "downscale it or raise --max-pixels") from None
        w = h = 0  # the caller allowed more than Pillow's cap: OpenCV decodes it
    if max_pixels and w * h > max_pixels:
        raise InputError(f"image {path} is {w}x{h} ({_mp(w * h)}), above the {_mp(max_pixels)} limit; "
                         "downscale it or raise --max-pixels")
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise InputError(f"cannot read image {path}: {exc.strerror or exc}") from exc
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None or image.size == 0:
        raise InputError(f"cannot decode image {path} (empty, damaged or not an image file)")
    return image


def read_image_rgb(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> "PIL.Image.Image":
    """:func:`read_image` as an RGB PIL image, for Hugging Face processors (training, the transformers side of eval
    and bench): the same decoder and bound as the edge runtime, so both see the same pixels."""
    import cv2
    from PIL import Image

    return Image.fromarray(cv2.cvtColor(read_image(path, max_pixels), cv2.COLOR_BGR2RGB))
