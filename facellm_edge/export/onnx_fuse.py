"""Fuse the vision tower's attention into ONNX Runtime's ``com.microsoft.MultiHeadAttention`` (CPU graphs only).

``torch.onnx`` (dynamo) writes InternViT's ``scaled_dot_product_attention`` as plain ops. Per layer and head it
materialises the full score matrix and its softmax (FaceLLM-1B: 16 heads x 1025 x 1025 fp32 = 67 MB each), which was
the largest transient of the runtime (+147 MB per encode). ONNX Runtime's CPU MultiHeadAttention kernel computes the
same attention in blocks. Measured on FaceLLM-1B int8 (benchmarks/README "memory"): transient 147 -> 88 MB, same speed,
cosine 0.9998 against the unfused int8 graph (the int8 activation quantisation amplifies fp32 rounding).

Only the int8 graph is fused: it runs on CPUs only, while the fp32 graph stays plain ONNX for TensorRT (which has no
contrib ops and would split the engine at every fused node).

The matched pattern, one per encoder layer (names as torch.onnx writes them; shapes for batch B, S tokens, H heads):

    q2d, k2d, v2d : [B, S, H*D]          outputs of the q/k/v Linear (MatMul + Add, or MatMulIntegerToFloat)
    q = Transpose(Reshape(q2d))          [B, H, S, D]
    k = Reshape(Transpose(Reshape(Transpose(Reshape(k2d)))))   [B, H, D, S]  (k transposed, maybe via Slice shapes)
    v = Transpose(Reshape(v2d))          [B, H, S, D]
    scores = MatMul(Mul(q, c), Mul(k, c))    c = sqrt(scale)
    out    = MatMul(Softmax(scores, axis=-1), v)
    y      = Reshape(Transpose(out, perm=[0, 2, 1, 3]))   [B, S, H*D]
becomes ``y = MultiHeadAttention(q2d, k2d, v2d, num_heads=H, scale=c*c)``. Anything else raises ``FusionMismatch``
for that block, which is then left as it was (and counted).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
_WALK_THROUGH = ("Transpose", "Reshape")  # layout ops between a Linear output and the attention inputs


class FusionMismatch(Exception):
    """This attention block does not have the expected shape; it is left unfused."""


@dataclass(frozen=True)
class FusionReport:
    fused: int
    skipped: int
    reasons: tuple[str, ...]


class _Graph:
    def __init__(self, graph: Any, base_dir: Path | None) -> None:
        self.g = graph
        self.base_dir = base_dir
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {t.name: t for t in graph.initializer}

    def prod(self, name: str, op: str | tuple[str, ...]) -> Any:
        n = self.producer.get(name)
        ops = (op,) if isinstance(op, str) else op
        if n is None or n.op_type not in ops:
            raise FusionMismatch(f"{name} is produced by {n.op_type if n else 'a graph input'}, not {'/'.join(ops)}")
        return n

    def only_consumer(self, name: str, op: str) -> Any:
        users = self.consumers.get(name, [])
        if len(users) != 1 or users[0].op_type != op:
            raise FusionMismatch(f"{name} should feed exactly one {op}, feeds {[u.op_type for u in users]}")
        return users[0]

    def const(self, name: str) -> Any:
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name], base_dir=str(self.base_dir or ""))
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant":
            return numpy_helper.to_array(n.attribute[0].t)
        raise FusionMismatch(f"{name} is not a constant")

    def linear_output(self, name: str) -> tuple[str, Any]:
        """Walk back through Transpose/Reshape to the [B, S, H*D] tensor; also return the first Reshape met."""
        n = self.producer.get(name)
        first_reshape = None
        while n is not None and n.op_type in _WALK_THROUGH:
            if n.op_type == "Reshape" and first_reshape is None:
                first_reshape = n
            name = n.input[0]
            n = self.producer.get(name)
        if first_reshape is None:
            raise FusionMismatch(f"no Reshape between {name} and the attention")
        return name, first_reshape


def _match(gr: _Graph, softmax: Any) -> tuple[Any, Any]:
    """(the MultiHeadAttention node, the node it replaces) for one Softmax, or FusionMismatch."""
    from onnx import helper

    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    if axis != -1:
        raise FusionMismatch(f"softmax over axis {axis}")
    scores = gr.prod(softmax.input[0], "MatMul")
    q_mul, k_mul = gr.prod(scores.input[0], "Mul"), gr.prod(scores.input[1], "Mul")
    c_q, c_k = gr.const(q_mul.input[1]), gr.const(k_mul.input[1])
    if c_q.size != 1 or c_k.size != 1 or float(c_q) != float(c_k):
        raise FusionMismatch("q and k are not scaled by the same scalar")
    attn = gr.only_consumer(softmax.output[0], "MatMul")
    if attn.input[0] != softmax.output[0]:
        raise FusionMismatch("softmax is not the left operand of the value MatMul")
    back = gr.only_consumer(attn.output[0], "Transpose")
    perm = next((list(a.ints) for a in back.attribute if a.name == "perm"), [])
    if perm != [0, 2, 1, 3]:
        raise FusionMismatch(f"output transpose perm {perm}")
    merge = gr.only_consumer(back.output[0], "Reshape")
    q2d, q_reshape = gr.linear_output(q_mul.input[0])
    k2d, _ = gr.linear_output(k_mul.input[0])
    v2d, _ = gr.linear_output(attn.input[1])
    shape = gr.const(q_reshape.input[1])  # [B, S, H, D] as torch.onnx writes view(B, S, H, D)
    if shape.size != 4 or int(shape[2]) <= 0:
        raise FusionMismatch(f"q reshape target {shape.tolist()} is not [B, S, H, D]")
    mha = helper.make_node("MultiHeadAttention", [q2d, k2d, v2d], [merge.output[0]], domain=MS_DOMAIN,
                           name=f"{softmax.name or merge.output[0]}/fused_mha", num_heads=int(shape[2]),
                           scale=float(c_q) ** 2)
    return mha, merge


def fuse_attention(model: Any, base_dir: Path | None = None) -> FusionReport:
    """Rewrite ``model`` (an onnx ModelProto, external data may stay unloaded) in place."""
    from onnx import helper

    gr = _Graph(model.graph, base_dir)
    replace: dict[int, Any] = {}
    reasons: list[str] = []
    for softmax in [n for n in model.graph.node if n.op_type == "Softmax"]:
        try:
            mha, merge = _match(gr, softmax)
        except FusionMismatch as exc:
            reasons.append(str(exc))
            continue
        replace[id(merge)] = mha
    if replace:
        nodes = [replace.get(id(n), n) for n in model.graph.node]
        # Drop what only the replaced ops used (the score path, the head reshapes); graph outputs anchor the walk.
        needed = {o.name for o in model.graph.output}
        kept = []
        for n in reversed(nodes):
            if any(o in needed for o in n.output):
                kept.append(n)
                needed.update(i for i in n.input if i)
        kept.reverse()
        del model.graph.node[:]
        model.graph.node.extend(kept)
        inits = [t for t in model.graph.initializer if t.name in needed]
        del model.graph.initializer[:]
        model.graph.initializer.extend(inits)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    report = FusionReport(fused=len(replace), skipped=len(reasons), reasons=tuple(dict.fromkeys(reasons)))
    if report.skipped:
        log.warning("attention: %d block(s) fused, %d left as plain ops (%s)", report.fused, report.skipped,
                    "; ".join(report.reasons))
    return report
