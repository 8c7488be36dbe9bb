"""The ONNX lowering's one trace gives the same graphs as the two it replaced.

``lower_onnx`` traces each program once straight to functional ATen
(``export_programs(aten=True)``) and lets ``torch.onnx.export`` skip its own decomposition; before,
the program was exported to the training IR and the exporter re-traced it through
``run_decompositions``. Per family and split, both routes are lowered and compared node by node:
same operators in the same order, same attributes, same wiring, same initializer contents
(only the exporter's value names may differ).
"""

from __future__ import annotations

import contextlib
import hashlib
import io

import pytest
import torch

from flexsfl.export.lower_onnx import OPSET, write_onnx_program
from flexsfl.export.programs import build_head_programs, export_programs
from flexsfl.model.loading import load_model
from flexsfl.model.partition import build_head


def _canonical(model) -> list[tuple]:
    """Nodes with values named by position, graph inputs by name and initializers by content."""
    from onnx import helper, numpy_helper

    names = {t.name: "init:" + hashlib.sha256(numpy_helper.to_array(t).tobytes() + str(list(t.dims)).encode()).hexdigest()
             for t in model.graph.initializer}
    names.update({i.name: "in:" + i.name for i in model.graph.input})
    out = []
    for n in model.graph.node:
        for o in n.output:
            names.setdefault(o, f"v{len(names)}")
        attrs = tuple(sorted((a.name, str(helper.get_attribute_value(a))) for a in n.attribute))
        out.append((n.op_type, tuple(names.get(x, x) for x in n.input), tuple(names[o] for o in n.output), attrs))
    return out + [("output", names[o.name]) for o in model.graph.output]


def _two_trace(ep, spec):
    """The route before: the training-IR program, decomposed again inside the exporter."""
    with contextlib.redirect_stdout(io.StringIO()):
        onx = torch.onnx.export(ep, (), dynamo=True, opset_version=OPSET, optimize=True,
                                input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs])
    return onx.model_proto


# bert-1 in `make test`; a deeper cut and the llama family in `make test-slow` (CI time: ~1.5 min between them)
@pytest.mark.parametrize("family,split", [("bert", 1), pytest.param("bert", 2, marks=pytest.mark.slow),
                                          pytest.param("llama", 1, marks=pytest.mark.slow)])
def test_one_trace_lowers_to_the_same_graphs(tiny_model_dirs, tmp_path, family, split):
    import onnx

    head = build_head(load_model(str(tiny_model_dirs[family]), num_labels=2), split)
    names = [n for n, _ in head.trainable()]
    programs = build_head_programs(head, names, max_batch=4, max_seq=16)
    before = export_programs(programs)
    after = export_programs(programs, aten=True)
    for which, spec, old, new in (("forward", programs.forward_spec, before[0], after[0]),
                                  ("backward", programs.backward_spec, before[1], after[1])):
        path = write_onnx_program(new, spec, tmp_path / f"{which}.onnx", which, decomposed=True)
        got, want = _canonical(onnx.load(path)), _canonical(_two_trace(old, spec))
        assert len(got) == len(want), (which, len(got), len(want))
        diff = next(((g, w) for g, w in zip(got, want) if g != w), None)
        assert diff is None, (which, diff)
