"""The Python API: ``FaceLLM.load(bundle_dir)`` then ``ask(image, question)`` -> one answer per face, or
``ask_images([image, ...], question)`` -> one answer about whole images (several per question, each tiled as the
checkpoint's processor tiles it).

Stages: detect (YuNet/SCRFD) -> align (5-point similarity, FairFace-like crop) -> encode (ONNX Runtime, all faces
of an image in one call) -> prefill (each face's image prefix into its own llama.cpp KV slot) -> answer.
No torch, no transformers. Thread-safe: the detector and the language model each have a lock, so the live loop can
detect in one thread while another generates; public calls serialise callers.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Hashable, Iterator, Sequence

import numpy as np

from facellm_edge.runtime.align import CropConfig, align_face
from facellm_edge.runtime.answers import FaceAnswer, ImagesAnswer, save_face_crops
from facellm_edge.bundle import Bundle, PromptSpec, load_bundle
from facellm_edge.runtime.detect import Detector, DetectorConfig, check_image, create_detector
from facellm_edge.runtime.encode import DEVICES, EncoderConfig, VisionEncoder
from facellm_edge.errors import UsageError
from facellm_edge.runtime.faces import Face
from facellm_edge.io import DEFAULT_MAX_PIXELS
from facellm_edge.runtime.preprocess import crop_to_pixels, crops_to_pixels, image_to_pixels
from facellm_edge.system_prompt import resolve_system

if TYPE_CHECKING:
    from facellm_edge.llm.generator import Answer, GenerationConfig, Generator
    from facellm_edge.llm.engine import EngineConfig

__all__ = ["FaceAnswer", "FaceLLM", "ImagesAnswer", "RuntimeConfig", "save_face_crops"]

log = logging.getLogger(__name__)

_PROMPT_CELLS = 64  # per face beside the image tokens: the chat template (11 tokens with the Qwen2.5 template of
# the tests' bundles: 6 around the image, 5 after the question) and a question of up to ~50 tokens
_MIN_SLOTS = 4
_MAX_AUTO_SLOTS = 64


@dataclass(frozen=True)
class RuntimeConfig:
    """Everything the runtime can be told. One source of defaults for the API and the CLI."""

    detector: str = "yunet"
    detector_model: Path | None = None
    detector_threads: int | None = None
    score_threshold: float = 0.6
    max_faces: int = 0  # 0 = every face found
    device: str = "auto"  # ONNX Runtime: auto | cpu | cuda | tensorrt
    vision_precision: str | None = None  # None = the bundle's preferred (int8 when present)
    vision_threads: int | None = None
    llm_quant: str | None = None  # None = the bundle's preferred GGUF
    n_threads: int | None = None  # llama.cpp generation threads (None = all cores)
    n_threads_batch: int | None = None  # llama.cpp prefill threads (None = all cores)
    n_ctx: int = 4096
    # Faces whose conversation (image prefix + turns) stays in the KV cache, so chat() can follow up without
    # re-encoding. None = as many as the context holds: n_ctx // (image tokens + 64 + max_tokens), at least 4 and at
    # most 64 (FaceLLM-1B, 4096 ctx, 128 tokens: 9). Each one costs n_vocab * 4 bytes of llama.cpp output buffer
    # (0.6 MB at Qwen2.5's vocabulary) whether used or not; the KV cells are shared.
    max_slots: int | None = None
    n_gpu_layers: int = 0
    crop: CropConfig = field(default_factory=CropConfig)
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.0
    grammar: str | None = None  # GBNF constraining every answer (e.g. from a JSON schema: --schema FILE)
    seed: int = 0
    check_hashes: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS  # image files above this are refused from their header (0 = no limit)
    # The system message: None = the bundle's own (manifest prompt.system: none unless exported with --system);
    # "none" | "intern_vl" | the message text (facellm_edge.system_prompt).
    system: str | None = None

    def __post_init__(self) -> None:
        # Checked here, so a bad value fails before any bundle is resolved (or exported on first use) or loaded.
        if self.device not in DEVICES:
            raise UsageError(f"unknown device '{self.device}'; choose one of: {', '.join(DEVICES)}")
        if self.system is not None:
            resolve_system(self.system)

    def prompt_for(self, prompt: PromptSpec) -> PromptSpec:
        """The bundle's prompt with this config's system message (``system`` None: the bundle's unchanged)."""
        return prompt if self.system is None else prompt.with_system(resolve_system(self.system))

    def slots_for(self, num_image_tokens: int) -> int:
        """``max_slots``, or when it is None the number of faces a context of ``n_ctx`` holds (see above)."""
        if self.max_slots is not None:
            return self.max_slots
        per_face = num_image_tokens + _PROMPT_CELLS + self.max_tokens
        return max(_MIN_SLOTS, min(_MAX_AUTO_SLOTS, self.n_ctx // per_face))

    def for_live(self) -> "RuntimeConfig":
        """The live-loop thread policy on small CPUs, for every thread count left unset: 1 llama.cpp thread + 1
        detector thread (on 2 cores, two llama threads beside a busy detector collapse decoding ~100x)."""
        one = lambda v: 1 if v is None else v  # noqa: E731
        return replace(self, n_threads=one(self.n_threads), n_threads_batch=one(self.n_threads_batch),
                       detector_threads=one(self.detector_threads), vision_threads=one(self.vision_threads))

    def detector_config(self) -> DetectorConfig:
        return DetectorConfig(name=self.detector, model_path=self.detector_model, score_threshold=self.score_threshold,
                              max_faces=self.max_faces, n_threads=self.detector_threads)

    def generation(self, max_tokens: int | None = None, temperature: float | None = None) -> "GenerationConfig":
        from facellm_edge.llm.generator import GenerationConfig

        return GenerationConfig(
            max_tokens=self.max_tokens if max_tokens is None else max_tokens,
            temperature=self.temperature if temperature is None else temperature,
            top_p=self.top_p, top_k=self.top_k, repeat_penalty=self.repeat_penalty, grammar=self.grammar,
        )

    def engine(self) -> "EngineConfig":
        from facellm_edge.llm.generator import EngineConfig

        return EngineConfig(n_ctx=self.n_ctx, n_threads=self.n_threads, n_threads_batch=self.n_threads_batch,
                            max_slots=self.max_slots, n_gpu_layers=self.n_gpu_layers, seed=self.seed)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def _check_question(question: object) -> None:
    if not isinstance(question, str) or not question.strip():
        raise UsageError("the question is empty; ask something")


def _whole_image_face(image: np.ndarray) -> Face:
    h, w = image.shape[:2]
    return Face(box=np.array([0, 0, w, h]), score=1.0, landmarks=np.zeros((5, 2)))


class FaceLLM:
    """A loaded bundle: detector + vision encoder + language model. Use as a context manager or call close()."""

    def __init__(self, bundle: Bundle, config: RuntimeConfig, generator: "Generator", encoder: VisionEncoder) -> None:
        self.bundle = bundle
        self.config = config
        self.generator = generator
        self.encoder = encoder
        self._detector: Detector | None = None
        self._detect_lock = threading.Lock()
        self._llm_lock = threading.RLock()
        self._keys = itertools.count()
        self._asked: list[Hashable] = []  # keys of the last ask(): kept for chat(), dropped at the next ask()

    @classmethod
    def load(cls, bundle_dir: str | Path, config: RuntimeConfig = RuntimeConfig()) -> "FaceLLM":
        from facellm_edge.llm.generator import Generator

        bundle = load_bundle(bundle_dir, check_hashes=config.check_hashes)
        if bundle.manifest.image.size != config.crop.size:
            config = replace(config, crop=replace(config.crop, size=bundle.manifest.image.size))
        config = replace(config, max_slots=config.slots_for(bundle.manifest.tokens.num_image_tokens))
        prompt = config.prompt_for(bundle.manifest.prompt)
        generator = Generator.from_bundle(bundle, config.llm_quant, config.engine(), prompt=prompt)
        try:
            encoder = VisionEncoder.from_bundle(
                bundle, EncoderConfig(device=config.device, precision=config.vision_precision,
                                      n_threads=config.vision_threads),
                llm_width=generator.n_embd,
            )
        except BaseException:
            generator.close()
            raise
        log.info("loaded %s: vision %s, llm %s", bundle.root, encoder.precision, bundle.llm_file(config.llm_quant)[0])
        return cls(bundle, config, generator, encoder)

    # -- lifetime -----------------------------------------------------------------------------------------
    def close(self) -> None:
        with self._llm_lock:
            self.generator.close()

    def __enter__(self) -> "FaceLLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- stages (used by ask() and by the live loop) ------------------------------------------------------
    @property
    def detector(self) -> Detector:
        with self._detect_lock:
            if self._detector is None:
                self._detector = create_detector(self.config.detector_config())
            return self._detector

    def detect(self, image_bgr: np.ndarray) -> list[Face]:
        image = check_image(image_bgr)
        detector = self.detector
        with self._detect_lock:
            t0 = time.perf_counter()
            faces = detector.detect(image)
            dt = _ms(t0)
        for f in faces:
            f.timings["detect"] = dt
        return faces

    def encode_faces(self, image_bgr: np.ndarray, faces: list[Face]) -> list[Face]:
        """Align every face (``face.crop``) and encode all crops in one ONNX call (``face.embeds``)."""
        if not faces:
            return faces
        for f in faces:
            t0 = time.perf_counter()
            f.crop = align_face(image_bgr, f.landmarks, self.config.crop)
            f.timings["align"] = _ms(t0)
        t0 = time.perf_counter()
        embeds = self.encoder.encode(crops_to_pixels([f.crop for f in faces], self.bundle.manifest.image))
        dt = _ms(t0)
        for f, e in zip(faces, embeds):
            f.embeds, f.timings["encode"] = e, dt
        return faces

    def prefill(self, key: Hashable, face: Face) -> None:
        with self._llm_lock:
            t0 = time.perf_counter()
            self.generator.prefill_image(key, face.embeds.reshape(-1, face.embeds.shape[-1]))
            face.timings["prefill"] = _ms(t0)

    def answer(self, key: Hashable, question: str, *, max_tokens: int | None = None,
               temperature: float | None = None, on_token: Callable[[str], None] | None = None) -> "Answer":
        """Ask ``question`` about the face prefilled under ``key``; returns the generator's ``Answer``."""
        with self._llm_lock:
            return self.generator.ask(key, question, self.config.generation(max_tokens, temperature), on_token)

    def has(self, key: Hashable) -> bool:
        with self._llm_lock:
            return self.generator.has(key)

    def forget(self, key: Hashable) -> None:
        with self._llm_lock:
            self.generator.drop(key)

    def new_key(self, prefix: str = "face") -> Hashable:
        return (prefix, next(self._keys))

    # -- the API --------------------------------------------------------------------------------------------
    def ask(self, image_bgr: np.ndarray, question: str, *, max_tokens: int | None = None,
            temperature: float | None = None, save_crops: str | Path | None = None) -> list[FaceAnswer]:
        """Answer ``question`` about every face in ``image_bgr``; [] when there is no face."""
        with self._llm_lock:
            return [self._answer_face(i, face, key, question, max_tokens, temperature)
                    for i, face, key in self._prefilled_faces(image_bgr, question, save_crops)]

    def stream(self, image_bgr: np.ndarray, question: str, *, max_tokens: int | None = None,
               temperature: float | None = None) -> Iterator[tuple[int, str]]:
        """Yield (face index, text piece) as each face's answer is decoded, face after face. The model is busy
        (other callers wait) until the iterator is exhausted or closed."""
        with self._llm_lock:
            gen = self.config.generation(max_tokens, temperature)
            for i, face, key in self._prefilled_faces(image_bgr, question, None):
                pieces = self.generator.stream(key, question, gen)
                while True:
                    try:
                        piece = next(pieces)
                    except StopIteration as stop:
                        face.answer = stop.value.text
                        break
                    yield i, piece

    def chat(self, face: "FaceAnswer | ImagesAnswer", question: str, *, max_tokens: int | None = None,
             temperature: float | None = None) -> "FaceAnswer | ImagesAnswer":
        """A follow-up question about a face from the last :meth:`ask` (or the images of the last
        :meth:`ask_images`), reusing its cached image prefix."""
        with self._llm_lock:
            if not self.generator.has(face.key):
                whose = f"face {face.index}'s" if isinstance(face, FaceAnswer) else "the images'"
                raise UsageError(
                    f"{whose} conversation is no longer cached: a newer ask() replaced it, or more "
                    f"faces than the KV cache keeps (max_slots={self.config.max_slots}, n_ctx={self.config.n_ctx}); "
                    "ask about the image again, or raise RuntimeConfig.n_ctx (--ctx) and max_slots"
                )
            ans = self.answer(face.key, question, max_tokens=max_tokens, temperature=temperature)
        timings = {"ttft": ans.timings["ttft_ms"], "decode": ans.timings["decode_ms"]}
        return replace(face, text=ans.text, token_ids=ans.token_ids, stop_reason=ans.stop_reason, timings=timings)

    def ask_crop(self, image_bgr: np.ndarray, question: str, *, max_tokens: int | None = None,
                 temperature: float | None = None) -> FaceAnswer:
        """No detection: the whole image is the face crop (resized to one tile if needed), e.g. for MCQ eval."""
        image = check_image(image_bgr)
        face = _whole_image_face(image)
        face.crop = image
        t0 = time.perf_counter()
        face.embeds = self.encoder.encode(crop_to_pixels(image, self.bundle.manifest.image))[0]
        face.timings["encode"] = _ms(t0)
        return self._answer_face(0, face, None, question, max_tokens, temperature)

    def ask_image(self, image_bgr: np.ndarray, question: str, *, max_tokens: int | None = None,
                  temperature: float | None = None) -> FaceAnswer:
        """No detection: the whole frame, tiled as the checkpoint's processor tiles it (InternVL's dynamic tiling,
        up to ``max_tiles`` + thumbnail, when the bundle's ``image.crop_to_patches``)."""
        image = check_image(image_bgr)
        face = _whole_image_face(image)
        t0 = time.perf_counter()
        face.embeds = self.encoder.encode(image_to_pixels(image, self.bundle.manifest.image)).reshape(
            -1, self.encoder.width)
        face.timings["encode"] = _ms(t0)
        return self._answer_face(0, face, None, question, max_tokens, temperature)

    def ask_images(self, images_bgr: Sequence[np.ndarray], question: str, *, max_tokens: int | None = None,
                   temperature: float | None = None) -> ImagesAnswer:
        """One question about one or more whole images (no detection), as InternVL is asked with several images:
        one ``<img>…</img>`` block per image, in order, then the question. Each image is tiled as the checkpoint's
        processor tiles it; all tiles are encoded in one call."""
        if isinstance(images_bgr, np.ndarray) or not images_bgr:
            raise UsageError("ask_images takes a non-empty list of images (BGR uint8 arrays)")
        _check_question(question)
        spec, timings = self.bundle.manifest.image, {}
        t0 = time.perf_counter()
        pixels = [image_to_pixels(check_image(im), spec) for im in images_bgr]
        timings["preprocess"] = _ms(t0)
        t0 = time.perf_counter()
        embeds = self.encoder.encode(np.concatenate(pixels))
        timings["encode"] = _ms(t0)
        bounds = np.cumsum([0] + [len(p) for p in pixels])
        per_image = [embeds[a:b].reshape(-1, self.encoder.width) for a, b in zip(bounds[:-1], bounds[1:])]
        with self._llm_lock:
            key = self.new_key("images")
            t0 = time.perf_counter()
            n_prefix = self.generator.prefill_images(key, per_image)
            timings["prefill"] = _ms(t0)
            self._new_ask([key])
            ans = self.answer(key, question, max_tokens=max_tokens, temperature=temperature)
        timings.update(ttft=ans.timings["ttft_ms"], decode=ans.timings["decode_ms"])
        return ImagesAnswer(text=ans.text, token_ids=ans.token_ids, stop_reason=ans.stop_reason,
                            tiles=tuple(len(p) for p in pixels), n_prompt=n_prefix + ans.n_prefilled,
                            timings=timings, key=key)

    # -- internals ------------------------------------------------------------------------------------------
    def _new_ask(self, keys: list[Hashable]) -> None:
        """A new ask replaces the last one: its conversations leave the KV cache; ``keys`` (new) are kept for
        chat(). Callers hold the LLM lock."""
        for old in self._asked:
            self.generator.drop(old)
        self._asked = list(keys)

    def _prefilled_faces(self, image_bgr, question, save_crops) -> Iterator[tuple[int, Face, Hashable]]:
        """detect -> align -> encode (one batch) -> per face: prefill its image prefix; yields (index, face, key)."""
        _check_question(question)
        image = check_image(image_bgr)
        faces = self.detect(image)
        if len(faces) > self.config.max_slots:
            log.info("%d faces but %d KV slots: chat() can follow up on the last %d only (raise n_ctx and max_slots "
                     "to keep them all)", len(faces), self.config.max_slots, self.config.max_slots)
        self.encode_faces(image, faces)
        if save_crops is not None:
            save_face_crops(faces, Path(save_crops))
        self._new_ask([])
        for i, face in enumerate(faces):
            key = self.new_key()
            self.prefill(key, face)
            self._asked.append(key)
            yield i, face, key

    def _answer_face(self, index: int, face: Face, key: Hashable | None, question: str, max_tokens: int | None,
                     temperature: float | None) -> FaceAnswer:
        with self._llm_lock:
            if key is None:
                key = self.new_key()
                self.prefill(key, face)
                self._new_ask([key])
            ans = self.answer(key, question, max_tokens=max_tokens, temperature=temperature)
        face.answer = ans.text
        face.timings["ttft"] = ans.timings["ttft_ms"]
        face.timings["decode"] = ans.timings["decode_ms"]
        return FaceAnswer(
            index=index, box=tuple(float(v) for v in face.box), score=face.score,
            landmarks=tuple((float(x), float(y)) for x, y in face.landmarks), text=ans.text,
            token_ids=ans.token_ids, stop_reason=ans.stop_reason, timings=dict(face.timings), key=key,
            track_id=face.track_id,
        )
