"""Many faces at once: the faces of one photo answered one after another vs together, with the runtime's own calls.

For N = 1, 2, 4, 6 … faces of the benchmark photo (insightface's t1.jpg has 6), each answering ``decode_tokens``
tokens (``stop_at_eos=False``):

- **one after another** (the runtime before batching: six new people = six cold paths): per face
  ``FaceLLM.encode_faces(image, [face])`` -> ``FaceLLM.open_face`` (image prefill) -> ``FaceSession.ask``;
- **together** (what ``ask``, ``serve`` and the live worker now do): ``FaceLLM.encode_faces(image, faces)`` (one
  ONNX Runtime call on a GPU; face by face on the CPU, where one batched call measured slower) ->
  ``FaceLLM.open_encoded`` (every image prefix in the same llama_decode calls) ->
  ``answer_together`` (question prefill and every decoding step one llama_decode for all faces, each face with its
  own sampler and stop).

Reported per N (medians of ``runs``): the wall time of each way and their ratio, split into vision (encode) and
language model (image prefill + question + decode); the time until every face has its first token; and the
aggregate decode rate (all faces' tokens / the decoding phase's wall time). Runs in a fresh subprocess
(``stages.run_isolated``) like the other configurations.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from facellm_edge.bench.edge import read_bgr, runtime_config
from facellm_edge.timings import ms_since

FACE_COUNTS = (1, 2, 4, 6)


def faces_payload(bundle: Path, vision: str, quant: str, image: Path, question: str, runs: int, warmup: int,
                  decode_tokens: int, threads: int, detector_model: Path | None,
                  vision_prepack: str = "auto", device: str = "cpu") -> dict[str, Any]:
    return {"bundle": str(bundle), "vision": vision, "quant": quant, "image": str(image), "question": question,
            "runs": runs, "warmup": warmup, "decode_tokens": decode_tokens, "threads": threads,
            "detector_model": str(detector_model) if detector_model else None, "vision_prepack": vision_prepack,
            "device": device}


def run_faces(p: dict[str, Any]) -> dict[str, Any]:
    """Subprocess entry: one after another vs together for each face count the photo allows."""
    from facellm_edge.runtime.pipeline import FaceLLM
    from facellm_edge.runtime.session import answer_together

    image, question = read_bgr(p["image"]), p["question"]
    cfg = runtime_config(p, threads=int(p["threads"]))
    cfg = replace(cfg, engine=replace(cfg.engine, max_slots=max(FACE_COUNTS)))
    gen = cfg.generation
    rows = []
    with FaceLLM.load(p["bundle"], cfg) as model:
        faces_all = model.detect(image)
        found = len(faces_all)
        if not found:
            return {"faces_in_photo": 0, "counts": []}
        counts = [n for n in FACE_COUNTS if n <= found]

        def one_after_another(n: int) -> dict[str, float]:
            vision = llm = 0.0
            for face in faces_all[:n]:
                face.timings.clear()
                t0 = time.perf_counter()
                model.encode_faces(image, [face])
                vision += ms_since(t0)
                t0 = time.perf_counter()
                with model.open_face(face) as session:
                    session.answer_checked(question, gen)
                llm += ms_since(t0)
            return {"vision_ms": vision, "llm_ms": llm, "total_ms": vision + llm}

        def together(n: int) -> dict[str, float]:
            faces = faces_all[:n]
            t0 = time.perf_counter()
            model.encode_faces(image, faces)
            vision = ms_since(t0)
            t1 = time.perf_counter()
            sessions = model.open_encoded(faces)
            answers = answer_together(sessions, question, gen)
            llm = ms_since(t1)
            for s in sessions:
                s.close()
            prefill = faces[0].timings["image_prefill"]
            first = max(a.timings["ttft"] for a in answers)
            decode_wall = max(a.timings["ttft"] + a.timings["decode"] for a in answers) - \
                min(a.timings["ttft"] for a in answers)
            tokens = sum(a.n_generated for a in answers)
            return {"vision_ms": vision, "llm_ms": llm, "total_ms": vision + llm,
                    "all_first_token_ms": vision + prefill + first, "decode_tok_s": tokens / (decode_wall / 1e3)
                    if decode_wall > 0 else 0.0, "tokens": tokens}

        for _ in range(int(p["warmup"])):  # first calls (ORT and llama.cpp buffers) are not measured
            together(1)
            one_after_another(1)
        for n in counts:
            seq = [one_after_another(n) for _ in range(int(p["runs"]))]
            bat = [together(n) for _ in range(int(p["runs"]))]
            med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
            row = {"faces": n}
            for way, runs in (("one_after_another", seq), ("together", bat)):
                row[way] = {k: med(runs, k) for k in runs[0]}
            row["ratio_total"] = row["together"]["total_ms"] / row["one_after_another"]["total_ms"]
            row["ratio_llm"] = row["together"]["llm_ms"] / row["one_after_another"]["llm_ms"]
            rows.append(row)
    return {"faces_in_photo": found, "decode_tokens": int(p["decode_tokens"]), "runs": int(p["runs"]),
            "question": question, "counts": rows}


def faces_lines(faces: dict[str, Any] | None) -> list[str]:
    """The results.md section."""
    if not faces or not faces.get("counts"):
        return []
    lines = ["", f"## Many faces at once ({faces['faces_in_photo']} faces in the photo, {faces['decode_tokens']} "
             f"tokens each, medians of {faces['runs']}" + (f"; {faces['config']}" if faces.get("config") else "")
             + ")", "",
             "One after another = per face: encode, image prefill, answer (the runtime before batching). Together = "
             "the faces encoded together (one encoder call on a GPU, face by face on the CPU), their image prefixes "
             "and every decoding step in shared llama_decode calls (`FaceLLM.open_encoded` + `answer_together`: "
             "what `ask`, `serve` and the live worker do).", "",
             "| faces | one after another ms (vision + LLM) | together ms (vision + LLM) | together / one after "
             "another (all) | (LLM only) | every face's first token ms | aggregate decode tok/s |",
             "|---|---|---|---|---|---|---|"]
    for r in faces["counts"]:
        s, t = r["one_after_another"], r["together"]
        lines.append(f"| {r['faces']} | {s['total_ms']:.0f} ({s['vision_ms']:.0f} + {s['llm_ms']:.0f}) | "
                     f"{t['total_ms']:.0f} ({t['vision_ms']:.0f} + {t['llm_ms']:.0f}) | {r['ratio_total']:.2f} | "
                     f"{r['ratio_llm']:.2f} | {t['all_first_token_ms']:.0f} | {t['decode_tok_s']:.1f} |")
    return lines
