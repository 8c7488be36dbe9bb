"""ONNX Runtime's standard on-device training artifacts for a head.

ONNX Runtime's on-device training API (C, C++, C#, Java, Python) trains a model from four files:
``training_model.onnx`` (forward + loss + gradient graph), ``eval_model.onnx`` (forward + loss),
``optimizer_model.onnx`` and ``checkpoint`` (the parameters, trainable and frozen). This module
builds them for a head, so any ORT training client can fine-tune its LoRA adapters::

    export (torch.onnx, dynamo) -> prepare (protected folding, Split, LayerNorm outputs)
        -> generate (onnxblock with the surrogate loss, fixed for ORT 1.19) -> verify (vs eager torch)

The loss is the split-learning surrogate ``loss = sum(smashed * server_g)``: its gradient with
respect to the adapters is the vector-Jacobian product of the head with the server's upstream
gradient ``G``, so one training step of these artifacts is one client step of FlexP-SFL.

Every unstable or private API of ONNX Runtime training, onnxscript and the torch ONNX exporter
that the export path needs lives here, so a version bump touches this one file. The
onnxruntime-training import is lazy: it ships for x86_64 only, and this module must import (and
say clearly what is missing) where it is absent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import re
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import torch
from onnxscript import rewriter
from onnxscript.optimizer import _constant_folding as constant_folding
from torch.nn.attention import SDPBackend, sdpa_kernel

from flexsfl.core.bundle import TensorSpec
from flexsfl.core.constants import OPTIMIZERS
from flexsfl.core.errors import ConfigError, ExportError

__all__ = [
    "TRAINING_MODEL_NAME",
    "EVAL_MODEL_NAME",
    "OPTIMIZER_MODEL_NAME",
    "CHECKPOINT_NAME",
    "ADAMW_HYPERPARAMETERS",
    "OrtTrainingArtifacts",
    "build_ort_training_artifacts",
]

log = logging.getLogger("flexsfl.export.ort")

# ORT's own file names (what its samples and docs expect).
TRAINING_MODEL_NAME = "training_model.onnx"
EVAL_MODEL_NAME = "eval_model.onnx"
OPTIMIZER_MODEL_NAME = "optimizer_model.onnx"
CHECKPOINT_NAME = "checkpoint"

# Graph input/output names. None may end in "_grad": ORT's Module takes such inputs for
# gradient buffers and then refuses the training call ("Train input name index out of range").
_IDS, _MASK, _SERVER_G, _LOSS, _SMASHED = "input_ids", "attention_mask", "server_g", "loss", "smashed"
_BATCH, _SEQ = "batch", "seq"  # the bundle's names for the dynamic dims

_OPSET = 18
_ORT_MAX_IR_VERSION = 10  # onnxruntime 1.19 refuses newer; onnx 1.23 stamps 14 on what it builds
_VERIFY_RTOL = 1e-4

# torch.optim.AdamW's defaults. ORT runs them in its PyTorch mode (adam_mode=0: bias correction
# on each moment, decay before the update), so a step on the device equals a torch.optim step.
ADAMW_HYPERPARAMETERS: Mapping[str, object] = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}

_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


@dataclasses.dataclass(frozen=True)
class OrtTrainingArtifacts:
    """The four ORT training files of one head, and how to drive them.

    Training model: ``(input_ids int64 [batch, seq], attention_mask int64 [batch, seq],
    server_g float32 [batch, seq, d]) -> (loss float32 [], smashed float32 [batch, seq, d])``,
    and it accumulates the gradient of every trainable parameter. The eval model has the same
    inputs and outputs (feed zeros as ``server_g`` when only ``smashed`` is wanted) and uses the
    current trained weights of the shared checkpoint state.
    """

    training_model: pathlib.Path
    eval_model: pathlib.Path
    optimizer_model: pathlib.Path
    checkpoint: pathlib.Path
    optimizer: Mapping[str, object]  # {"name": "sgd"} or {"name": "adamw", **ADAMW_HYPERPARAMETERS}
    inputs: tuple[TensorSpec, ...]  # of the training and the eval model, in call order
    outputs: tuple[TensorSpec, ...]  # (loss, smashed)
    parameters: Mapping[str, str]  # head parameter name -> name in the ONNX graphs/checkpoint, in param_names order
    timings: Mapping[str, float]  # seconds per step: export, prepare, generate, verify

    @property
    def files(self) -> dict[str, pathlib.Path]:
        """Bundle role -> path of each artifact."""
        return {
            "ort.training": self.training_model,
            "ort.eval": self.eval_model,
            "ort.optimizer": self.optimizer_model,
            "ort.checkpoint": self.checkpoint,
        }

    @property
    def sizes(self) -> dict[str, int]:
        """Bundle role -> size in bytes."""
        return {role: path.stat().st_size for role, path in self.files.items()}


def build_ort_training_artifacts(
    head: torch.nn.Module,
    param_names: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    max_batch: int,
    max_seq: int,
    optimizer: Literal["sgd", "adamw"] = "sgd",
    example_batch: tuple[int, int] = (2, 16),
    label: str | None = None,
    verify: bool = True,
) -> OrtTrainingArtifacts:
    """Export ``head`` and build ORT's training, eval and optimizer models and checkpoint in ``out_dir``.

    ``head(input_ids int64 [B, T], attention_mask int64 [B, T]) -> z float32 [B, T, d]`` is a CPU
    float32 module with PEFT LoRA layers inside; ``param_names`` are its trainable parameters (the
    lora_A/lora_B tensors) in order. Every other parameter is frozen and goes into the checkpoint.
    The graphs are the eval-mode forward (dropout off), so a step is deterministic and matches
    eager torch. Batch and sequence length are dynamic up to ``max_batch`` and ``max_seq``;
    ``example_batch`` (B, T), both at least 2, is the shape the exporter traces with.

    With ``verify`` (the default) one training step of the result on a padded batch is checked
    against ``torch.autograd`` before returning. ``label`` (e.g. "minilm split 3") names the
    head in error messages.

    Files appear in ``out_dir`` only once all were built (others there are left alone, same-named
    ones replaced). Raises :class:`ConfigError` for bad arguments and :class:`ExportError` when a
    step fails; the head is left as it was. Not thread-safe: while ORT builds the graphs, the
    process's working directory and file descriptor 2 are redirected.
    """
    label = label or type(head).__name__
    params = _check_arguments(head, param_names, max_batch, max_seq, optimizer, example_batch)
    _require_ort_training(label)
    out = pathlib.Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"out_dir {out}: cannot create it ({e.strerror}); pass a writable directory") from None
    example = _example_inputs(head, example_batch)
    timings: dict[str, float] = {}

    def step(name: str, hint: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        except Exception as e:  # the exporter and ORT raise anything; name the step and the cause
            raise ExportError(f"could not build ORT training artifacts for {label} ({name}): {_cause(e)}; {hint}") from e
        finally:
            timings[name] = time.perf_counter() - t0

    modes = {m: m.training for m in head.modules()}
    head.eval()
    try:
        with tempfile.TemporaryDirectory(prefix=".ort-", dir=out) as stage:
            stage = pathlib.Path(stage)
            model = step("export", _HINT_EXPORT, _export_forward, head, example, max_batch, max_seq)
            proto = step("prepare", _HINT_GRAPH, _prepare_for_training, model, head)
            step("generate", _HINT_GRAPH, _generate, proto, head, params, optimizer, stage)
            if verify:
                step("verify", _HINT_VERIFY, _verify, stage, head, params, example)
            inputs, outputs = _specs(stage / EVAL_MODEL_NAME)
            # Finished files move from the stage beside ``out``: each rename is atomic (same file
            # system), and in a bundle ``out`` is itself inside the pipeline's staging directory.
            for name in (TRAINING_MODEL_NAME, EVAL_MODEL_NAME, OPTIMIZER_MODEL_NAME, CHECKPOINT_NAME):
                os.replace(stage / name, out / name)
    finally:
        for m, training in modes.items():
            m.training = training
    log.info("ORT training artifacts for %s in %s (%s)", label, out, ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return OrtTrainingArtifacts(
        training_model=out / TRAINING_MODEL_NAME,
        eval_model=out / EVAL_MODEL_NAME,
        optimizer_model=out / OPTIMIZER_MODEL_NAME,
        checkpoint=out / CHECKPOINT_NAME,
        optimizer={"name": optimizer, **(ADAMW_HYPERPARAMETERS if optimizer == "adamw" else {})},
        inputs=inputs,
        outputs=outputs,
        parameters={n: n for n in param_names},  # the exporter keeps torch's names; _frozen_parameters checked
        timings=timings,
    )


_HINT_EXPORT = (
    "try loading the model with attn_implementation='eager', and check that the head's forward "
    "keeps batch and sequence length symbolic (no Python ints taken from .shape)"
)
_HINT_GRAPH = "an op of this head may have no gradient in onnxruntime-training 1.19; try the executorch backend"
_HINT_VERIFY = "the artifacts disagree with eager torch; try the executorch backend and report this model"


def _cause(e: BaseException) -> str:
    """One line from an exception chain: the innermost cause, which names what went wrong."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e) if isinstance(e, ExportError) else f"{type(e).__name__}: {e}"
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # torch colours its messages
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def _check_arguments(
    head: torch.nn.Module,
    param_names: Sequence[str],
    max_batch: int,
    max_seq: int,
    optimizer: str,
    example_batch: tuple[int, int],
) -> dict[str, torch.nn.Parameter]:
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer {optimizer!r} is not one of ORT's: pass 'sgd' or 'adamw'")
    b, t = example_batch
    if not (2 <= b <= max_batch and 2 <= t <= max_seq):
        # The exporter specializes dims whose example size is 1, and refuses examples out of range.
        raise ConfigError(
            f"example_batch {example_batch} must lie in 2..max_batch ({max_batch}) and 2..max_seq ({max_seq})"
        )
    if isinstance(param_names, str) or not param_names:
        raise ConfigError("param_names is empty: pass the head's trainable LoRA parameter names, in order")
    if len(set(param_names)) != len(param_names):
        raise ConfigError("param_names lists a name twice; pass each trainable parameter once")
    named = dict(head.named_parameters())
    params = {}
    for n in param_names:
        p = named.get(n)
        if p is None:
            raise ConfigError(f"param_names: the head has no parameter {n!r}; pass names from head.named_parameters()")
        if not p.requires_grad:
            raise ConfigError(f"param_names: parameter {n!r} does not require grad; pass only trainable (LoRA) parameters")
        params[n] = p
    for n, p in named.items():
        if p.dtype != torch.float32 or p.device.type != "cpu":
            raise ConfigError(f"head parameter {n!r} is {p.dtype} on {p.device}; export a float32 head on the CPU")
    return params


def _require_ort_training(label: str) -> None:
    try:
        import onnxruntime.training.api  # noqa: F401  (only to fail early with a clear message)
    except ImportError as e:
        raise ExportError(
            f"could not build ORT training artifacts for {label}: onnxruntime-training is not installed ({e}); "
            "install flexsfl[export] on x86_64 Linux (it has no wheel for other platforms) or use the executorch backend"
        ) from None


def _example_inputs(head: torch.nn.Module, example_batch: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch that exercises padding: the last row ends in T // 4 padding tokens."""
    # Token ids must index every embedding of the head; the word embedding is the largest.
    sizes = [m.num_embeddings for m in head.modules() if isinstance(m, torch.nn.Embedding)]
    if not sizes:
        raise ConfigError(f"head {type(head).__name__} has no nn.Embedding to take input_ids; pass a head built by flexsfl.model.partition")
    b, t = example_batch
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(sizes), (b, t), generator=gen)
    mask = torch.ones(b, t, dtype=torch.int64)
    mask[-1, t - t // 4 :] = 0
    return ids, mask


def _export_forward(
    head: torch.nn.Module, example: tuple[torch.Tensor, torch.Tensor], max_batch: int, max_seq: int
) -> ir.Model:
    """``head`` as an ONNX graph with named dynamic dims "batch" and "seq" (unoptimized)."""
    batch = torch.export.Dim(_BATCH, min=1, max=max_batch)
    seq = torch.export.Dim(_SEQ, min=1, max=max_seq)
    # The math SDPA kernel decomposes into ops that have ORT gradients; the fused ones do not.
    with sdpa_kernel([SDPBackend.MATH]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on axis renaming and deprecations
        program = torch.onnx.export(
            head,
            example,
            input_names=[_IDS, _MASK],
            output_names=[_SMASHED],
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),  # by position: forward's arg names may differ
            opset_version=_OPSET,
            dynamo=True,
            # The exporter's default optimizer folds Transpose(lora weight) into anonymous
            # constants, leaving nothing to train; _prepare_for_training runs a protected one.
            optimize=False,
            verbose=False,
        )
    model = program.model
    for v in (*model.graph.inputs, *model.graph.outputs):
        # Where the forward pins a dim (a Python int taken from .shape), the exporter quietly
        # specializes it instead of failing.
        dims = tuple(getattr(d, "value", d) for d in v.shape[:2])
        if dims != (_BATCH, _SEQ):
            raise ExportError(f"the graph's {v.name} has fixed dims {dims} where dynamic ({_BATCH}, {_SEQ}) are needed")
    return model


def _prepare_for_training(model: ir.Model, head: torch.nn.Module) -> onnx.ModelProto:
    """Fold constants without touching parameters, and fix what ORT's gradient builder refuses."""
    parameters = {n for n, _ in head.named_parameters(remove_duplicate=False)}

    def should_fold(node: ir.Node) -> bool | None:
        # Folding an op that reads a parameter would bake the parameter into an anonymous
        # constant: trainable ones could not be trained, frozen ones would leave the checkpoint.
        if any(v is not None and v.is_initializer() and v.name in parameters for v in node.inputs):
            return False
        return None

    ir.passes.Sequential(
        ir_passes.InlinePass(),
        ir.passes.PassManager(
            [
                # Also rewrites torch.split's SplitToSequence/SequenceAt (no gradient) into Split.
                constant_folding.FoldConstantsPass(
                    shape_inference=True,
                    input_size_limit=constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                    output_size_limit=constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                    should_fold=should_fold,
                ),
                rewriter.RewritePass(rewriter._DEFAULT_REWRITE_RULES),
                ir_passes.RemoveUnusedNodesPass(),
            ],
            steps=2,
            early_stop=True,
        ),
        # No DeduplicateInitializersPass: PEFT starts every lora_B at zero, and merging equal
        # tensors would make one parameter of many (and duplicate gradient names in ORT).
        ir_passes.RemoveUnusedNodesPass(),
        ir_passes.RemoveUnusedOpsetsPass(),
    )(model)
    proto = ir.serde.serialize_model(model)
    for node in proto.graph.node:
        # The exporter's per-node stack traces triple the eval model and leak local paths.
        del node.metadata_props[:]
        node.doc_string = ""
        if node.op_type == "LayerNormalization":
            # ORT's LayerNormalizationGrad reads the optional Mean and InvStdDev outputs.
            while len(node.output) < 3:
                node.output.append(f"{node.output[0]}.stat{len(node.output)}")
    if any(n.op_type in ("SplitToSequence", "SequenceAt") for n in proto.graph.node):
        raise ExportError("a SplitToSequence could not be rewritten to Split (its sizes are not static)")
    return proto


def _frozen_parameters(proto: onnx.ModelProto, head: torch.nn.Module, params: Mapping[str, torch.nn.Parameter]) -> list[str]:
    """Names of the frozen parameters in the graph, after checking each trainable one holds its tensor."""
    inits = {t.name: t for t in proto.graph.initializer}
    for name, p in params.items():
        t = inits.get(name)
        if t is None:
            raise ExportError(f"trainable parameter {name!r} is not an initializer of the exported graph (renamed or folded)")
        if not np.array_equal(onnx.numpy_helper.to_array(t), p.detach().numpy()):
            raise ExportError(f"initializer {name!r} does not hold the head's tensor of that name")
    # Frozen parameters go into the checkpoint, shared by the training and eval models; buffers
    # and exporter constants stay inside the graphs, where ORT can fold them.
    return [n for n, _ in head.named_parameters(remove_duplicate=False) if n in inits and n not in params]


def _generate(
    proto: onnx.ModelProto,
    head: torch.nn.Module,
    params: Mapping[str, torch.nn.Parameter],
    optimizer: str,
    stage: pathlib.Path,
) -> None:
    """Write ORT's four artifacts for ``proto`` into ``stage``."""
    from onnxruntime.training import artifacts, onnxblock

    class ServerGradLoss(onnxblock.Block):
        """``loss = ReduceSum(smashed * server_g)``; ``server_g`` becomes a graph input like ``smashed``."""

        def build(self, smashed: str) -> str:
            server_g = onnxblock.blocks.InputLike(smashed)(_SERVER_G)
            product = f"{_SMASHED}.{_SERVER_G}"
            self.base.graph.node.append(onnx.helper.make_node("Mul", [smashed, server_g], [product], name="ServerGradMul"))
            self.base.graph.node.append(onnx.helper.make_node("ReduceSum", [product], [_LOSS], name="ServerGradSum", keepdims=0))
            return _LOSS

    # onnxblock's Block.__del__ deletes temp.onnx in the directory that was current when the block
    # was made, so every block is made (and run) in the staging directory, not the user's cwd.
    with contextlib.chdir(stage), _native_stderr_silenced():
        if optimizer == "adamw":
            h = ADAMW_HYPERPARAMETERS
            optim = onnxblock.optim.AdamW(betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"])
        else:
            optim = onnxblock.optim.SGD()
        artifacts.generate_artifacts(
            proto,
            requires_grad=list(params),
            frozen_params=_frozen_parameters(proto, head, params),
            loss=ServerGradLoss(),
            optimizer=optim,
            artifact_directory=stage,
            additional_output_names=[_SMASHED],
        )
    _fix_for_ort(stage)


@contextlib.contextmanager
def _native_stderr_silenced():
    """Drop what native code writes to fd 2: ORT logs every graph transformer at INFO level there."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _fix_for_ort(stage: pathlib.Path) -> None:
    """Make the generated files load in onnxruntime-training 1.19, quietly, and step like torch.optim."""
    for name in (TRAINING_MODEL_NAME, EVAL_MODEL_NAME, OPTIMIZER_MODEL_NAME):
        model = onnx.load(stage / name)
        model.ir_version = min(model.ir_version, _ORT_MAX_IR_VERSION)
        if name == OPTIMIZER_MODEL_NAME:
            for out in model.graph.output:
                # onnxblock declares the update flag as [1] where ORT infers a scalar, and every
                # Optimizer load then logs a shape-merge warning on the device.
                out.type.tensor_type.ClearField("shape")
            for node in model.graph.node:
                if node.op_type == "AdamWOptimizer":
                    # onnxblock hard-codes Hugging Face's AdamW (adam_mode=1); see ADAMW_HYPERPARAMETERS.
                    for attr in node.attribute:
                        if attr.name == "adam_mode":
                            attr.i = 0
        onnx.save(model, stage / name)


def _verify(
    stage: pathlib.Path,
    head: torch.nn.Module,
    params: Mapping[str, torch.nn.Parameter],
    example: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """One training call of the artifacts must give eager torch's smashed data and LoRA gradients."""
    from onnxruntime.training.api import CheckpointState, Module

    ids, mask = example
    z = head(ids, mask)
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    want = torch.autograd.grad(z, list(params.values()), grad_outputs=g)
    state = CheckpointState.load_checkpoint(str(stage / CHECKPOINT_NAME))
    module = Module(str(stage / TRAINING_MODEL_NAME), state, str(stage / EVAL_MODEL_NAME), device="cpu")
    module.train()
    _, smashed = module(ids.numpy(), mask.numpy(), g.numpy())
    got = np.concatenate([state.parameters[n].grad.ravel() for n in params])
    want = np.concatenate([w.numpy().ravel() for w in want])
    for what, a, b in (("smashed", smashed, z.detach().numpy()), ("gradient", got, want)):
        err = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
        if not err <= _VERIFY_RTOL:
            raise ExportError(f"{what} differs from eager torch by relative error {err:.1e} (limit {_VERIFY_RTOL:.0e})")


def _specs(model_path: pathlib.Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """User inputs and outputs as declared by the model (parameters are inputs too; skip them)."""
    graph = onnx.load(model_path, load_external_data=False).graph

    def spec(v: onnx.ValueInfoProto) -> TensorSpec:
        t = v.type.tensor_type
        return TensorSpec(v.name, _DTYPES[t.elem_type], tuple(d.dim_param or d.dim_value for d in t.shape.dim))

    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    return tuple(spec(inputs[n]) for n in (_IDS, _MASK, _SERVER_G)), tuple(spec(outputs[n]) for n in (_LOSS, _SMASHED))
