"""Rewrite the decomposed GELU in an ONNX program into ONNX Runtime's fused CPU kernel.

The exporter writes GELU as five elementwise passes (``Div → Erf → Add → Mul → Mul``), each
reading and writing a whole ``[B, T, 4d]`` tensor. ONNX Runtime's CPU execution provider has a
one-pass kernel for it in its ``com.microsoft`` contrib domain, which every standard build
registers (the PyPI wheels for x86_64 and aarch64 included; only a build made with
``--disable_contrib_ops`` lacks it): ``x · ½ (1 + erf(x / √2))`` -> ``com.microsoft::Gelu(x)``.
(SiLU as ``com.microsoft::QuickGelu(alpha=1)`` was measured too: no gain over Sigmoid + Mul at
SmolLM2 split 2, and an approximate sigmoid; so Llama-family heads keep theirs.)

A pattern is rewritten only when its intermediate values have no other reader and are not graph
outputs, so a value the backward saves (the activation's input or output) stays exactly where
it was: the program's inputs, outputs and saved activations are unchanged, only the nodes between
them differ. Backward programs keep their decomposed form (the fused gradients, ``GeluGrad`` and
the like, exist only in ONNX Runtime's training builds); the export checks every rewritten program
against the torch programs, as for the plain ones.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["CONTRIB_DOMAIN", "fuse_activations", "contrib_ops"]

CONTRIB_DOMAIN = "com.microsoft"


def fuse_activations(model) -> dict[str, int]:
    """Rewrite ``model`` (an ``onnx.ModelProto``) in place; returns how many of each fused op it
    now has that it did not have before (``{"Gelu": 6}``), empty when nothing matched."""
    g = _Graph(model.graph)
    done: dict[str, int] = {}
    for node in list(model.graph.node):
        if node.op_type == "Erf" and node.domain in ("", "ai.onnx") and _gelu(g, node):
            done["Gelu"] = done.get("Gelu", 0) + 1
    if done and not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
        from onnx import helper

        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return done


def contrib_ops(models) -> list[str]:
    """``domain::op`` of every non-standard operator the models use, sorted (the manifest's record)."""
    return sorted({f"{n.domain}::{n.op_type}" for m in models for n in m.graph.node if n.domain not in ("", "ai.onnx")})


class _Graph:
    """Who reads each value, and the graph's small constants (scalar initializers)."""

    def __init__(self, graph) -> None:
        from onnx import numpy_helper

        self.graph = graph
        self.outputs = {o.name for o in graph.output}
        self.consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer if len(t.dims) <= 1 and _numel(t) == 1}
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                a = numpy_helper.to_array(n.attribute[0].t)
                if a.size == 1:
                    self.consts[n.output[0]] = a

    def readers(self, name: str) -> list:
        return [n for n in self.graph.node if name in n.input]

    def only_reader(self, name: str, op: str):
        """The one node reading ``name`` if it is an ``op`` and ``name`` is not a graph output."""
        users = self.readers(name)
        if name in self.outputs or len(users) != 1 or users[0].op_type != op or users[0].domain not in ("", "ai.onnx"):
            return None
        return users[0]

    def const(self, name: str) -> float | None:
        a = self.consts.get(name)
        return None if a is None else float(np.asarray(a).reshape(()))

    def other(self, node, name: str) -> str:
        """The input of binary ``node`` that is not ``name``."""
        a, b = node.input
        return b if a == name else a

    def replace(self, old: list, op: str, inputs: list[str], output: str, **attrs) -> None:
        from onnx import helper

        nodes = self.graph.node
        at = min(list(nodes).index(n) for n in old)
        for n in old:
            nodes.remove(n)
        nodes.insert(at, helper.make_node(op, inputs, [output], domain=CONTRIB_DOMAIN,
                                          name=f"{output}__fused_{op.lower()}", **attrs))
        # The pattern's constants, once nothing reads them (ONNX Runtime warns about each one left).
        dropped = {i for n in old for i in n.input if i in self.consts} - {i for n in nodes for i in n.input} - self.outputs
        for t in [t for t in self.graph.initializer if t.name in dropped]:
            self.graph.initializer.remove(t)
        for n in [n for n in nodes if n.op_type == "Constant" and n.output[0] in dropped]:
            nodes.remove(n)


def _numel(t) -> int:
    return int(np.prod(t.dims)) if t.dims else 1


def _close(v: float | None, want: float) -> bool:
    return v is not None and math.isclose(v, want, rel_tol=1e-6)


def _gelu(g: _Graph, erf) -> bool:
    """``Mul(x, Mul(½, Add(Erf(Div(x, √2)), 1)))`` (either operand order, ½ on either Mul) -> Gelu."""
    div = next((n for n in g.graph.node if erf.input[0] in n.output), None)
    if div is None or div.op_type != "Div" or not _close(g.const(div.input[1]), math.sqrt(2.0)):
        return False
    x = div.input[0]
    if g.only_reader(div.output[0], "Erf") is None:
        return False
    add = g.only_reader(erf.output[0], "Add")
    if add is None or not _close(g.const(g.other(add, erf.output[0])), 1.0):
        return False
    m1 = g.only_reader(add.output[0], "Mul")
    if m1 is None:
        return False
    m2 = g.only_reader(m1.output[0], "Mul")
    if m2 is None:
        return False
    # The remaining factors are x and ½, one on each Mul.
    factors = {g.other(m1, add.output[0]), g.other(m2, m1.output[0])}
    half = [f for f in factors if _close(g.const(f), 0.5)]
    if len(factors) != 2 or x not in factors or len(half) != 1:
        return False
    g.replace([div, erf, add, m1, m2], "Gelu", [x], m2.output[0])
    return True
