"""Images sent to the server: ``data:`` URLs, base64 text and multipart uploads, read into bytes here and decoded by
the toolkit's one bounded reader (:func:`facellm_edge.io.decode_image`: the header is checked against
``--max-pixels`` before any pixel is decoded). The server never fetches anything: ``http(s)://`` image URLs are
refused with a 400 that says how to send the image instead.

Decoding is CPU work: the routes call :func:`decode` through ``asyncio.to_thread``, never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from typing import TYPE_CHECKING

from facellm_edge.errors import InputError
from facellm_edge.io import sha256_bytes
from facellm_edge.serve.errors import APIError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ImageBytes", "decode", "from_base64", "from_url", "parse_multipart"]

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


@dataclass(frozen=True)
class ImageBytes:
    """An image as sent (not decoded yet): its bytes, their sha256 (the key of the face sessions made from it) and
    how errors name it (``messages[0].content[1].image_url``)."""

    data: bytes
    what: str

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.data)


def _bad(what: str, why: str) -> APIError:
    return APIError(400, f"{what}: {why}", code="invalid_image", param=what)


def from_url(url: object, what: str) -> ImageBytes:
    """An OpenAI ``image_url.url``: a ``data:`` URL with base64 (or percent-encoded) image bytes; anything else is
    refused (remote URLs are never fetched)."""
    if not isinstance(url, str) or not url:
        raise _bad(what, "expected a data: URL string (data:image/jpeg;base64,...)")
    head = url[:16].lower()
    if head.startswith(("http://", "https://")):
        raise APIError(400, f"{what}: remote image URLs are not fetched (the server never downloads anything); "
                       "send the image inline as a data: URL (data:image/jpeg;base64,...)",
                       code="remote_image_url", param=what)
    match = _DATA_URL.match(url)
    if match is None:
        raise _bad(what, "not a data: URL; send data:image/jpeg;base64,... (JPEG, PNG or WebP)")
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith("image/") and mime != "application/octet-stream":
        raise _bad(what, f"the data: URL holds {mime}, not an image")
    payload = url[match.end():]
    if match.group("b64"):
        return from_base64(payload, what)
    from urllib.parse import unquote_to_bytes

    data = unquote_to_bytes(payload)
    if not data:
        raise _bad(what, "the image is empty")
    return ImageBytes(data, what)


def from_base64(text: object, what: str) -> ImageBytes:
    """Base64 image bytes (standard or URL-safe alphabet, whitespace ignored), or a ``data:`` URL."""
    if not isinstance(text, str) or not text.strip():
        raise _bad(what, "expected base64 image bytes (or a data: URL)")
    if text[:5].lower() == "data:" or text[:8].lower() in ("http://", "https://"):
        return from_url(text, what)
    compact = "".join(text.split())
    try:
        data = base64.b64decode(compact.replace("-", "+").replace("_", "/") + "=" * (-len(compact) % 4),
                                validate=True)
    except (binascii.Error, ValueError):
        raise _bad(what, "the base64 text does not decode") from None
    if not data:
        raise _bad(what, "the image is empty")
    return ImageBytes(data, what)


def decode(image: ImageBytes, max_pixels: int) -> "np.ndarray":
    """BGR uint8 pixels, or a 400 naming the image (damaged, not an image, above ``max_pixels``)."""
    from facellm_edge.io import decode_image

    try:
        return decode_image(image.data, max_pixels, what=image.what)
    except InputError as exc:
        raise APIError(400, str(exc), code="invalid_image", param=image.what) from None


def parse_multipart(body: bytes, content_type: str) -> dict[str, str | bytes]:
    """The fields of a ``multipart/form-data`` body: file fields as bytes, the others as text. Read with the
    standard library's MIME parser (the body is already bounded by ``--max-body-bytes``)."""
    if "boundary=" not in content_type.lower():
        raise APIError(400, "multipart/form-data without a boundary", code="invalid_request")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1", "replace")
                                                  + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise APIError(400, "the multipart/form-data body does not parse", code="invalid_request")
    fields: dict[str, str | bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            fields[str(name)] = payload
        else:
            fields[str(name)] = _text(payload, part.get_content_charset() or "utf-8", str(name))
    return fields


def _text(payload: bytes, charset: str, name: str) -> str:
    """A form field's text; a 400 for a charset Python does not know as a text encoding (``errors="replace"``
    covers bad bytes, not an unknown codec)."""
    try:
        return payload.decode(charset, errors="replace")
    except (LookupError, UnicodeError):
        raise APIError(400, f"the form field {name[:40]!r} has an unknown charset {charset[:40]!r}; send it as "
                            "utf-8", code="invalid_request", param=name[:40]) from None
