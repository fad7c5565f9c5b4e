"""The Python API: ``FaceLLM.load(bundle_dir)``, then ``ask(image, question)`` -> one answer per face, each carrying
the :class:`~facellm_edge.runtime.session.FaceSession` to follow up in; or open sessions yourself
(:meth:`FaceLLM.open_faces`, :meth:`FaceLLM.open_face`, :meth:`FaceLLM.open_images`) and ask in them.

Stages (:mod:`facellm_edge.timings`): detect (YuNet/SCRFD) -> align (5-point similarity, FairFace-like crop) ->
preprocess -> encode (ONNX Runtime; the faces of an image are handed over together: one call on a GPU, face by
face on the CPU, see :meth:`~facellm_edge.runtime.encode.VisionEncoder.encode`) -> image prefill (each face's
prompt prefix into its own llama.cpp KV slot, owned by the generator) -> question prefill -> decode. No torch, no
transformers.

Threads: images and questions are checked once, here, at the entry points. The detector has a lock (the live
loop detects in one thread while another generates); the language model's generator has its own, so calls on the
model are served one at a time; sessions may be used from any thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from facellm_edge.bundle import Bundle, load_bundle
from facellm_edge.errors import FaceLLMEdgeError, UsageError
from facellm_edge.llm.generator import check_question
from facellm_edge.llm.sampling import GenerationConfig
from facellm_edge.runtime.align import align_face
from facellm_edge.runtime.answers import FaceAnswer, ImagesAnswer, save_face_crops
from facellm_edge.runtime.config import RuntimeConfig
from facellm_edge.runtime.detect import Detector, check_image, create_detector
from facellm_edge.runtime.encode import VisionEncoder
from facellm_edge.runtime.faces import Face
from facellm_edge.runtime.preprocess import crop_to_pixels, crops_to_pixels, image_to_pixels
from facellm_edge.runtime.session import (
    FaceSession, Opened, answer_together_checked, new_session_id, stream_together_checked,
)
from facellm_edge.timings import ms_since, timed

if TYPE_CHECKING:
    from facellm_edge.llm.generator import Answer, Generator

# GenerationConfig: for per-call settings (``session.ask(question, generation=GenerationConfig(...))``).
__all__ = ["FaceAnswer", "FaceLLM", "FaceSession", "GenerationConfig", "ImagesAnswer", "RuntimeConfig",
           "save_face_crops"]

log = logging.getLogger(__name__)


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

    @classmethod
    def load(cls, bundle_dir: str | Path, config: RuntimeConfig = RuntimeConfig()) -> "FaceLLM":
        from facellm_edge.llm.generator import Generator

        bundle = load_bundle(bundle_dir, check_hashes=config.check_hashes)
        config = config.resolve(bundle.manifest.image.size, bundle.manifest.tokens.num_image_tokens)
        generator = Generator.from_bundle(bundle, config.engine, prompt=config.prompt_for(bundle.manifest.prompt))
        try:
            encoder = VisionEncoder.from_bundle(bundle, config.encoder, llm_width=generator.n_embd)
        except BaseException:
            generator.close()
            raise
        log.info("loaded %s: vision %s, llm %s", bundle.root, encoder.precision,
                 bundle.llm_file(config.engine.quant)[0])
        return cls(bundle, config, generator, encoder)

    # -- lifetime -----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the model (waits for an answer being generated, or a detection, on another thread): the language
        model, the vision encoder and the detector, so a closed model a program still references holds none of
        their memory. Open sessions become unusable; later calls say the model is closed."""
        self.generator.close()
        with self._detect_lock:  # the detector property checks _check_open under this lock: none is made after
            detector, self._detector = self._detector, None
            if detector is not None and hasattr(detector, "close"):
                detector.close()
        self.encoder.close()

    def _check_open(self) -> None:
        """A one-line :class:`UsageError` once :meth:`close` has run (the generator is closed first)."""
        if self.generator.closed:
            raise UsageError("this FaceLLM is closed; load the bundle again (FaceLLM.load)")

    def __enter__(self) -> "FaceLLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- stages ---------------------------------------------------------------------------------------------
    @property
    def detector(self) -> Detector:
        with self._detect_lock:
            self._check_open()  # every image call detects (or encodes) first: a closed model fails before any work
            if self._detector is None:
                self._detector = create_detector(self.config.detector)
            return self._detector

    def detect(self, image_bgr: np.ndarray) -> list[Face]:
        """The faces in a BGR image, most confident first, each with its ``detect`` time."""
        return self._detect(check_image(image_bgr))

    def encode_faces(self, image_bgr: np.ndarray, faces: list[Face]) -> list[Face]:
        """Align every face (``face.crop``) and encode the crops together (``face.embeds``); returns ``faces``."""
        return self.encode_faces_checked(check_image(image_bgr), faces)

    def encode_faces_checked(self, image: np.ndarray, faces: list[Face]) -> list[Face]:
        """:meth:`encode_faces` for an image its caller has already checked (e.g. the frame it detected the faces
        in with :meth:`detect`: the live worker, the server)."""
        if not faces:
            return faces
        for f in faces:
            with timed(f.timings, "align"):
                f.crop = align_face(image, f.landmarks, self.config.crop)
        t0 = time.perf_counter()
        pixels = crops_to_pixels([f.crop for f in faces], self.bundle.manifest.image)
        preprocess = ms_since(t0)
        t0 = time.perf_counter()
        embeds = self.encoder.encode(pixels)
        encode = ms_since(t0)
        for f, e in zip(faces, embeds):
            f.embeds = e
            f.timings.update(preprocess=preprocess, encode=encode)
        return faces

    # -- sessions -------------------------------------------------------------------------------------------
    def open_face(self, face: Face, *, index: int = 0) -> FaceSession:
        """A session about an encoded face (``face.embeds`` from :meth:`encode_faces`): its image prefix is decoded
        into the KV cache now (``face.timings["image_prefill"]``)."""
        return self.open_encoded([face], first_index=index)[0]

    def open_encoded(self, faces: Sequence[Face], *, first_index: int = 0, pin: bool = False) -> list[FaceSession]:
        """Sessions about several encoded faces at once (at most ``generator.max_slots``): their image prefixes
        share each llama_decode call; each face's ``image_prefill`` is the time until all were in the cache.
        ``pin``: they stay in the cache until their first answer has run (a prefill on another thread waits for
        their slots meanwhile) — for a caller that asks in them at once (``ask``, the live worker, serve)."""
        if not faces or len(faces) > self.generator.max_slots:
            raise UsageError(f"open_encoded takes 1..{self.generator.max_slots} faces (max_slots), got {len(faces)}")
        if any(f.embeds is None for f in faces):
            raise UsageError("a face has no embeddings yet; call encode_faces(image, faces) first")
        ids = [new_session_id() for _ in faces]
        t0 = time.perf_counter()
        lengths = self.generator.prefill_many([(sid, [f.embeds.reshape(-1, f.embeds.shape[-1])])
                                               for sid, f in zip(ids, faces)], pin=pin)
        prefill = ms_since(t0)
        sessions = []
        for j, (sid, n, face) in enumerate(zip(ids, lengths, faces)):
            face.timings["image_prefill"] = prefill
            opened = Opened(n_prefix=n, timings={k: v for k, v in face.timings.items() if k != "detect"})
            sessions.append(FaceSession(self.generator, self.config.generation, face, opened, session_id=sid,
                                        index=first_index + j))
        return sessions

    def open_faces(self, image_bgr: np.ndarray, *, save_crops: str | Path | None = None) -> list[FaceSession]:
        """Detect, align and encode every face of the image and open a session for each (in detection order). More
        faces than the KV cache keeps (``max_slots``) is a :class:`UsageError` before any is encoded: the first
        sessions would be evicted by the last ones (``ask`` answers such images group by group)."""
        return [s for group in self._open_faces(check_image(image_bgr), save_crops, keep_all=True) for s in group]

    def open_images(self, images_bgr: Sequence[np.ndarray]) -> FaceSession:
        """One session about one or more whole images (no detection), as InternVL is asked with several images:
        one ``<img>…</img>`` block per image, in order, then the question. Each image is tiled as the checkpoint's
        processor tiles it; all tiles are encoded together (one encoder call on a GPU, tile by tile on the CPU).
        Its ``face`` is None; ``tiles`` has the tile counts."""
        return self._open_images(_checked_images(images_bgr))

    # -- one-shot questions ---------------------------------------------------------------------------------
    def ask(self, image_bgr: np.ndarray, question: str, *, max_tokens: int | None = None,
            temperature: float | None = None, save_crops: str | Path | None = None) -> list[FaceAnswer]:
        """Answer ``question`` about every face in ``image_bgr``; [] when there is no face. The faces are answered
        together (up to ``max_slots`` at a time: one llama_decode per step for all of them). Each answer's
        ``session`` stays open for follow-ups until closed or evicted."""
        check_question(question)
        gen = self.config.generation.with_overrides(max_tokens, temperature)
        out = []
        for sessions in self._open_faces(check_image(image_bgr), save_crops, pin=True):
            with _closed_on_failure(sessions):
                answers = answer_together_checked(sessions, question, gen)
            out += [self._face_answer(s, a) for s, a in zip(sessions, answers)]
        return out

    def stream(self, image_bgr: np.ndarray, question: str, *, max_tokens: int | None = None,
               temperature: float | None = None) -> Iterator[tuple[int, str]]:
        """Yield (face index, text piece) as the faces' answers are decoded, one token per face per step (faces
        interleave). The model is busy (other callers wait) while the answers are being streamed."""
        check_question(question)
        gen = self.config.generation.with_overrides(max_tokens, temperature)
        for sessions in self._open_faces(check_image(image_bgr), None, pin=True):
            run = stream_together_checked(sessions, question, gen)
            try:
                for i, piece in run:
                    yield sessions[i].index, piece
            finally:  # no handle to these sessions leaves this call: their cells are freed, not left to the LRU
                run.close()  # first: it holds the model until closed
                _close_all(sessions)

    def chat(self, answer: "FaceAnswer | ImagesAnswer", question: str, *, max_tokens: int | None = None,
             temperature: float | None = None) -> "FaceAnswer | ImagesAnswer":
        """A follow-up question in an earlier answer's session (``answer.session.ask`` as an answer record)."""
        from dataclasses import replace

        ans = answer.session.ask(question, max_tokens=max_tokens, temperature=temperature)
        return replace(answer, text=ans.text, token_ids=ans.token_ids, stop_reason=ans.stop_reason,
                       timings=dict(ans.timings))

    def ask_crop(self, image_bgr: np.ndarray, question: str, *, max_tokens: int | None = None,
                 temperature: float | None = None) -> FaceAnswer:
        """No detection: the whole image is the face crop (resized to one tile if needed), e.g. for MCQ eval."""
        check_question(question)
        image = check_image(image_bgr)
        face = _whole_image_face(image)
        face.crop = image
        with timed(face.timings, "preprocess"):
            pixels = crop_to_pixels(image, self.bundle.manifest.image)
        with timed(face.timings, "encode"):
            face.embeds = self.encoder.encode(pixels)[0]
        session = self.open_encoded([face], pin=True)[0]
        with _closed_on_failure([session]):
            return self._face_answer(session, session.answer_checked(
                question, self.config.generation.with_overrides(max_tokens, temperature)))

    def ask_image(self, image_bgr: np.ndarray, question: str, *, max_tokens: int | None = None,
                  temperature: float | None = None) -> FaceAnswer:
        """No detection: the whole frame, tiled as the checkpoint's processor tiles it (InternVL's dynamic tiling,
        up to ``max_tiles`` + thumbnail, when the bundle's ``image.crop_to_patches``)."""
        check_question(question)
        image = check_image(image_bgr)
        session = self._open_images([image], _whole_image_face(image), pin=True)
        with _closed_on_failure([session]):
            return self._face_answer(session, session.answer_checked(
                question, self.config.generation.with_overrides(max_tokens, temperature)))

    def ask_images(self, images_bgr: Sequence[np.ndarray], question: str, *, max_tokens: int | None = None,
                   temperature: float | None = None) -> ImagesAnswer:
        """One question about one or more whole images (see :meth:`open_images`)."""
        check_question(question)
        session = self._open_images(_checked_images(images_bgr), pin=True)
        with _closed_on_failure([session]):
            ans = session.answer_checked(question, self.config.generation.with_overrides(max_tokens, temperature))
        return ImagesAnswer(text=ans.text, token_ids=ans.token_ids, stop_reason=ans.stop_reason, tiles=session.tiles,
                            n_prompt=session.n_prefix + ans.n_prefilled,
                            timings={**session.timings, **ans.timings}, session=session)

    # -- internals ------------------------------------------------------------------------------------------
    def _detect(self, image: np.ndarray) -> list[Face]:
        detector = self.detector
        with self._detect_lock:
            t0 = time.perf_counter()
            faces = detector.detect_checked(image)
            dt = ms_since(t0)
        for f in faces:
            f.timings["detect"] = dt
        return faces

    def _open_faces(self, image: np.ndarray, save_crops: str | Path | None, *, pin: bool = False,
                    keep_all: bool = False) -> Iterator[list[FaceSession]]:
        """detect -> align + encode (together) -> lazily, per group of up to ``max_slots`` faces: open their
        sessions together (image prefill; ``pin``: see :meth:`open_encoded`). ``keep_all``: every session must
        stay open, so more faces than slots is refused."""
        faces = self._detect(image)
        slots = self.generator.max_slots
        if keep_all and len(faces) > slots:
            raise UsageError(f"the image has {len(faces)} faces but the KV cache keeps {slots} sessions "
                             "(max_slots): open_faces would lose the first ones; use ask() (answers them group by "
                             "group) or raise EngineConfig.max_slots and n_ctx")
        if len(faces) > slots:
            log.info("%d faces but %d KV slots: answered %d at a time; only the last %d stay open for follow-ups "
                     "(raise n_ctx and max_slots to keep them all)", len(faces), slots, slots, slots)
        self.encode_faces_checked(image, faces)
        if save_crops is not None:
            save_face_crops(faces, Path(save_crops))
        for start in range(0, len(faces), slots):
            yield self.open_encoded(faces[start:start + slots], first_index=start, pin=pin)

    def _open_images(self, images: list[np.ndarray], face: Face | None = None, *, pin: bool = False) -> FaceSession:
        """Tile, encode (together) and prefill whole images into one session (``face``: a whole-image record)."""
        spec, timings = self.bundle.manifest.image, {} if face is None else face.timings
        with timed(timings, "preprocess"):
            pixels = [image_to_pixels(im, spec) for im in images]
        with timed(timings, "encode"):
            embeds = self.encoder.encode(np.concatenate(pixels))
        bounds = np.cumsum([0] + [len(p) for p in pixels])
        per_image = [embeds[a:b].reshape(-1, self.encoder.width) for a, b in zip(bounds[:-1], bounds[1:])]
        sid = new_session_id()
        with timed(timings, "image_prefill"):
            n = self.generator.prefill_images(sid, per_image, pin=pin)
        opened = Opened(n_prefix=n, tiles=tuple(len(p) for p in pixels), timings=dict(timings))
        return FaceSession(self.generator, self.config.generation, face, opened, session_id=sid)

    def _face_answer(self, session: FaceSession, ans: "Answer") -> FaceAnswer:
        face = session.face
        face.timings.update(ans.timings)
        return FaceAnswer(
            index=session.index, box=tuple(float(v) for v in face.box), score=face.score,
            landmarks=tuple((float(x), float(y)) for x, y in face.landmarks), text=ans.text,
            token_ids=ans.token_ids, stop_reason=ans.stop_reason, timings=dict(face.timings), session=session,
            track_id=face.track_id,
        )


def _checked_images(images_bgr: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The images of ``open_images`` / ``ask_images``: a non-empty list, each image checked."""
    if isinstance(images_bgr, np.ndarray) or not images_bgr:
        raise UsageError("ask_images takes a non-empty list of images (BGR uint8 arrays)")
    return [check_image(im) for im in images_bgr]


def _close_all(sessions: Sequence[FaceSession]) -> None:
    for session in sessions:
        with contextlib.suppress(FaceLLMEdgeError):  # a closed model: its cells went with it
            session.close()


@contextlib.contextmanager
def _closed_on_failure(sessions: Sequence[FaceSession]) -> Iterator[None]:
    """Sessions a one-shot call opened are its caller's only through its answers: when answering fails they are
    closed, not left holding KV cells that nothing can reach."""
    try:
        yield
    except BaseException:
        _close_all(sessions)
        raise
