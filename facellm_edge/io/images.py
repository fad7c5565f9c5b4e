"""The one image reader: every user photo the toolkit decodes (ask, run, eval, data build, training) goes through
:func:`read_image`, so each sees the same pixels (OpenCV's decoder, EXIF orientation applied) within the same
decoded-size bound, refused from the header before any pixel is decoded."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from facellm_edge.errors import InputError

if TYPE_CHECKING:
    import numpy as np
    import PIL.Image

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: 120 MB as BGR; bigger photos are refused before they are decoded


def image_size(path: "Path | BinaryIO", what: str | None = None) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding its pixels (Pillow reads the first few KB).
    ``path``: a file, or an open binary stream (``what`` names it in errors)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    what = what or f"image {path}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                return im.size
        except Image.DecompressionBombError as exc:  # Pillow's own cap (2 x MAX_IMAGE_PIXELS) refused the header
            found = re.search(r"Image size \((\d+) pixels\)", str(exc))  # Pillow names the header's size
            raise _TooLarge(int(found.group(1)) if found else 2 * (Image.MAX_IMAGE_PIXELS or 0),
                            exact=found is not None) from exc
        except (UnidentifiedImageError, SyntaxError, ValueError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:  # the file system's error, not the decoder's
                raise InputError(f"cannot read {what}: {exc.strerror or exc}") from exc
            raise InputError(f"cannot decode {what} (empty, damaged or not an image file)") from exc


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.1f}".removesuffix(".0") + " MP"


class _TooLarge(Exception):
    """Pillow refused the header as a decompression bomb: ``pixels`` is its size (``exact``) or a lower bound."""

    def __init__(self, pixels: int, exact: bool = False) -> None:
        super().__init__(pixels)
        self.pixels, self.exact = pixels, exact


RAISE_LIMIT = "downscale it or raise --max-pixels"


def _too_large(what: str, size: str, max_pixels: int, fix: str = RAISE_LIMIT) -> InputError:
    return InputError(f"{what} is {size}, above the {_mp(max_pixels)} limit; {fix}")


def check_image_header(source: "Path | BinaryIO", what: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                       fix: str = RAISE_LIMIT) -> None:
    """What :func:`read_image` checks before decoding, from the header alone (Pillow reads the first few KB): an
    unreadable file or no image, and an image above ``max_pixels`` (0 = no limit), are one-line
    :class:`InputError`s naming ``what`` (``fix``: what to do about a large one)."""
    try:
        w, h = image_size(source, what)
    except _TooLarge as big:
        if max_pixels and (big.pixels > max_pixels if big.exact else big.pixels >= max_pixels):
            raise _too_large(what, f"{_mp(big.pixels)}" if big.exact else f"more than {_mp(big.pixels)}",
                             max_pixels, fix) from None
        return  # the caller allowed more than this: OpenCV decodes it (and _decode checks what it decoded)
    if max_pixels and w * h > max_pixels:
        raise _too_large(what, f"{w}x{h} ({_mp(w * h)})", max_pixels, fix)


def _decode(data: "np.ndarray", what: str, max_pixels: int = 0) -> "np.ndarray":
    import cv2

    try:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    except cv2.error as exc:  # OpenCV's own bound (CV_IO_MAX_IMAGE_PIXELS, 2^30) or a decoder's failure
        why = "larger than OpenCV decodes (2^30 pixels)" if "MAX_IMAGE_PIXELS" in str(exc) else \
            " ".join(str(exc).split())[-160:]
        raise InputError(f"cannot decode {what}: {why}") from exc
    if image is None or image.size == 0:
        raise InputError(f"cannot decode {what} (empty, damaged or not an image file)")
    h, w = image.shape[:2]
    if max_pixels and w * h > max_pixels:  # a header Pillow could not size exactly: the decoded size decides
        raise _too_large(what, f"{w}x{h} ({_mp(w * h)})", max_pixels)
    return image


def read_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> "np.ndarray":
    """Read an image file as BGR uint8. Missing, unreadable, undecodable, or above ``max_pixels`` (checked on the
    header, before any pixel is decoded; 0 = no limit) -> :class:`~facellm_edge.errors.InputError`."""
    import numpy as np

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an image (`run --source {path}` answers every image in a folder)")
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    what = f"image {path}"
    check_image_header(path, what, max_pixels)
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise InputError(f"cannot read {what}: {exc.strerror or exc}") from exc
    return _decode(data, what, max_pixels)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "the image") -> "np.ndarray":
    """:func:`read_image` for bytes already in memory (an upload, a ``data:`` URL): same decoder, same bound."""
    import io

    import numpy as np

    check_image_header(io.BytesIO(data), what, max_pixels)
    return _decode(np.frombuffer(data, dtype=np.uint8), what, max_pixels)


def read_image_rgb(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> "PIL.Image.Image":
    """:func:`read_image` as an RGB PIL image, for Hugging Face processors (training, the transformers side of eval
    and bench): the same decoder and bound as the edge runtime, so both see the same pixels."""
    import cv2
    from PIL import Image

    return Image.fromarray(cv2.cvtColor(read_image(path, max_pixels), cv2.COLOR_BGR2RGB))
