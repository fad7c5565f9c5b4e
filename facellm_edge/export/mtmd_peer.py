"""llama.cpp's own InternVL vision encoder (libmtmd / clip.cpp) as a peer of the ONNX encoder.

``MtmdVision`` loads a bundle's ``vision/mmproj-f16.gguf`` through libmtmd (shipped in llama-cpp-python) and turns
one RGB image into the image-token embeddings llama.cpp would feed its LLM: ``mtmd_bitmap_init`` ->
``mtmd_tokenize`` (the media marker becomes ``<img>`` + image chunk + ``</img>``) -> ``mtmd_encode_chunk`` ->
``mtmd_get_output_embd``. libmtmd needs a text model (it checks the projector's output width against the LLM's
embedding width and tokenizes the ``<img>`` markers): the LLM GGUF is loaded memory-mapped without llama.cpp's CPU
repack, whose copies it would never use (FaceLLM-1B q4_0: +377 instead of +567 MB resident; llama.cpp still reads
the mapped file at load). ``vocab_only`` would be cheaper still, but then llama.cpp reports an embedding width of 0
and the width check against the mmproj is lost.

libmtmd preprocesses images itself (InternVL dynamic tiling; the mmproj written by this project records the tile range
the checkpoint's processor really uses, 1..12 for InternVL3): feed a tile-sized image (448x448), which is one tile
either way, to compare it with the ONNX path pixel for pixel. No torch here.
"""

from __future__ import annotations

import ctypes
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from facellm_edge.errors import InputError, RuntimeStageError, UsageError

log = logging.getLogger(__name__)


def require_files(mmproj: Path, text_gguf: Path) -> None:
    """Both GGUFs libmtmd needs exist (one clear line otherwise)."""
    for p, what in ((Path(mmproj), "mmproj GGUF"), (Path(text_gguf), "LLM GGUF")):
        if not p.is_file():
            raise InputError(f"{what} not found: {p} (export a bundle with `--vision mmproj`)")


@contextmanager
def tokenized(M: Any, ctx: Any, rgb: np.ndarray, text: bytes, *, add_special: bool) -> Iterator[list[Any]]:
    """``mtmd_tokenize`` of ``text`` (holding libmtmd's media marker) with ``rgb`` (uint8 HxWx3, RGB) as its image:
    yields the input chunks (valid inside the block); the bitmap and chunks are freed on leaving it."""
    img = np.ascontiguousarray(rgb)
    h, w = img.shape[:2]
    bitmap = M.mtmd_bitmap_init(w, h, img.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
    chunks = M.mtmd_input_chunks_init()
    try:
        if not bitmap or not chunks:
            raise RuntimeStageError("libmtmd could not allocate the image bitmap")
        inp = M.mtmd_input_text(text, len(text), add_special, True)
        rc = M.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), (M.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
        if rc != 0:
            raise RuntimeStageError(f"libmtmd could not preprocess a {w}x{h} image (mtmd_tokenize code {rc})")
        yield [M.mtmd_input_chunks_get(chunks, i) for i in range(M.mtmd_input_chunks_size(chunks))]
    finally:
        if chunks:
            M.mtmd_input_chunks_free(chunks)
        if bitmap:
            M.mtmd_bitmap_free(bitmap)


@dataclass(frozen=True)
class MtmdConfig:
    """How libmtmd runs the vision encoder. One source of defaults."""

    n_threads: int | None = None  # None -> os.cpu_count()
    flash_attn: bool | None = None  # None -> llama.cpp decides (auto); False for bit-closer f32 verification
    use_gpu: bool = False

    def __post_init__(self) -> None:
        if self.n_threads is not None and self.n_threads < 1:
            raise UsageError(f"n_threads {self.n_threads} must be >= 1 (or unset for all CPU cores)")

    @property
    def threads(self) -> int:
        return self.n_threads or os.cpu_count() or 1


class MtmdVision:
    """One mmproj loaded through libmtmd for one text model; ``encode`` returns [n_image_tokens, text_hidden]."""

    def __init__(self, mmproj: Path, text_gguf: Path, config: MtmdConfig = MtmdConfig()) -> None:
        import llama_cpp as L
        import llama_cpp.mtmd_cpp as M

        from facellm_edge.llm import engine
        from facellm_edge.signals import call_holding_signals

        self._L, self._M = L, M
        self.config = config
        self._model = None
        self._ctx = None
        mmproj, text_gguf = Path(mmproj), Path(text_gguf)
        require_files(mmproj, text_gguf)
        M.mtmd_log_set(engine.install_log_hook(L), ctypes.c_void_p(0))  # same routing as the LLM's logs
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = 0  # only hparams + vocabulary are used: the weights stay in the mapped file
        mparams.load_mode = L.LLAMA_LOAD_MODE_MMAP
        mparams.use_extra_bufts = False  # no CPU repack: it would copy every weight (+190 MB for 1B q4_0)
        self._model = engine.load_model(L, text_gguf, mparams)  # Ctrl-C / SIGTERM cancel the load
        if not self._model:
            raise InputError(f"llama.cpp cannot load {text_gguf} (not a GGUF, truncated, or an unknown architecture)")
        self.text_hidden = int(L.llama_model_n_embd(self._model))
        cparams = M.mtmd_context_params_default()
        cparams.use_gpu = config.use_gpu
        cparams.n_threads = config.threads
        cparams.print_timings = False
        cparams.warmup = False
        if config.flash_attn is not None:
            cparams.flash_attn_type = (L.LLAMA_FLASH_ATTN_TYPE_ENABLED if config.flash_attn
                                       else L.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self._marker = M.mtmd_default_marker()
        cparams.media_marker = self._marker
        try:
            self._ctx = call_holding_signals(
                lambda: M.mtmd_init_from_file(str(mmproj).encode(), self._model, cparams), M.mtmd_free)
        except BaseException:  # Ctrl-C / SIGTERM while libmtmd loaded: free the text model now
            self.close()
            raise
        if not self._ctx:
            self.close()
            raise RuntimeStageError(
                f"libmtmd refused {mmproj.name} with {text_gguf.name} (not an mmproj GGUF, an unsupported projector, "
                "or a projection width that differs from the LLM's); see the facellm_edge.llama_cpp log lines")
        if not M.mtmd_support_vision(self._ctx):
            self.close()
            raise RuntimeStageError(f"{mmproj.name} has no vision encoder")
        log.debug("libmtmd vision: %s, %d threads", mmproj.name, config.threads)

    def encode(self, rgb: np.ndarray) -> np.ndarray:
        """Embeddings of every image token of ``rgb`` (uint8 HxWx3, RGB) as float32 [n_tokens, text_hidden]."""
        if self._ctx is None:
            raise UsageError("this MtmdVision is closed")
        if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3):
            raise InputError(f"expected an RGB uint8 image HxWx3, got {getattr(rgb, 'dtype', type(rgb))} "
                             f"{getattr(rgb, 'shape', '')}")
        M = self._M
        with tokenized(M, self._ctx, rgb, self._marker, add_special=False) as chunks:
            out = []
            for chunk in chunks:
                if M.mtmd_input_chunk_get_type(chunk) != M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue  # the <img> / </img> text around the image
                n = int(M.mtmd_input_chunk_get_n_tokens(chunk))
                rc = M.mtmd_encode_chunk(self._ctx, chunk)
                if rc != 0:
                    raise RuntimeStageError(f"libmtmd failed to encode the image (mtmd_encode_chunk code {rc})")
                ptr = M.mtmd_get_output_embd(self._ctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(n, self.text_hidden)).copy())
        if not out:
            raise RuntimeStageError("libmtmd produced no image chunk for the image")
        return np.concatenate(out, axis=0)

    def close(self) -> None:
        if self._ctx is not None:
            self._M.mtmd_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            self._L.llama_model_free(self._model)
            self._model = None

    @property
    def closed(self) -> bool:
        return self._ctx is None

    def __enter__(self) -> "MtmdVision":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass
