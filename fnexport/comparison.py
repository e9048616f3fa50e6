"""Does an artifact compute what the PyTorch model computes? Numbers, thresholds and the verdict of one run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from fnexport.console import log
from fnexport.data import batches
from fnexport.model.reparam import reparameterize
from fnexport.recipes import Tolerance

# FP32 is judged by absolute logit error; reduced precisions by direction and agreement, since
# their max error grows with logit scale while what users see (the top class) should not change, and
# by max error relative to the logit scale (max_abs_rms), the one check a wrong scale cannot pass: 5x logits
# keep every cosine and every top-1, and score >= 4. Healthy artifacts measured (benchmarks/gate_scale.py:
# digits T0 with 10, 2 and 1 classes, random T0/T2): fp16 <= 0.0017, bf16 <= 0.022, int8 <= 1.31.
DEFAULTS: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-3, min_cosine=0.99999),
    "fp16": Tolerance(min_cosine=0.999, min_top1=0.98, max_abs_rms=0.02),
    "bf16": Tolerance(min_cosine=0.995, min_top1=0.95, max_abs_rms=0.1),
    "int8": Tolerance(min_cosine=0.98, min_top1=0.95, max_abs_rms=2.0),
    "int4": Tolerance(min_cosine=0.9, min_top1=0.8, max_abs_rms=2.0),
    "palettize8": Tolerance(min_cosine=0.98, min_top1=0.95, max_abs_rms=2.0),
    "palettize4": Tolerance(min_cosine=0.9, min_top1=0.8, max_abs_rms=2.0),
}


# Backbones: every output judged on its own by the worst per-image cosine (flattened) and by max abs error over
# that output's largest reference magnitude (max_rel). FP32 1e-4: what "matches the feature maps" means to a
# detector (measured 1e-7..1e-6 on ONNX Runtime and OpenVINO f32, tests/test_backbone.py); the reduced precisions
# follow the classifier cosines, with max_rel as the check a wrong scale cannot pass.
FEATURE_DEFAULTS: dict[str, Tolerance] = {
    "fp32": Tolerance(max_rel=1e-4, min_cosine=0.99999),
    "fp16": Tolerance(max_rel=0.01, min_cosine=0.999),
    "bf16": Tolerance(max_rel=0.05, min_cosine=0.995),
    "int8": Tolerance(max_rel=0.5, min_cosine=0.98),
    "int4": Tolerance(max_rel=1.0, min_cosine=0.9),
    "palettize8": Tolerance(max_rel=0.5, min_cosine=0.98),
    "palettize4": Tolerance(max_rel=1.0, min_cosine=0.9),
}


def tolerance_for(precision: str, *overrides: Tolerance | None, backbone: bool = False) -> Tolerance:
    """The precision's default thresholds, then each override's set fields in order (recipe, then flags)."""
    tol = (FEATURE_DEFAULTS if backbone else DEFAULTS)[precision]
    for override in overrides:
        if override is not None:
            tol = tol.model_copy(update=override.model_dump(exclude_none=True))
    return tol


@dataclass
class ParityReport:
    """Errors of one artifact against the reference on the same inputs, and the verdict."""

    n: int
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    top1: float | None  # None: the model has 1 class, so top-1 cannot disagree (not a 100% that means nothing)
    top5: float | None  # None: 5 classes or fewer, so every class is in the top 5
    ref_accuracy: float | None
    accuracy: float | None
    tolerance: dict
    failures: list[str] = field(default_factory=list)
    ran: dict = field(default_factory=dict)
    # Max abs error over the RMS of all reference logits (see scaled_error): comparable across models.
    max_abs_rms: float = float("nan")
    # Checks that could not fail on this model or data and were therefore not counted as passed.
    not_applicable: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}

    def summary(self) -> str:
        acc = "" if self.accuracy is None else f", accuracy {self.accuracy:.2%} (ref {self.ref_accuracy:.2%})"
        top1 = "n/a" if self.top1 is None else f"{self.top1:.2%}"
        return (
            f"{self.n} images: max abs {self.max_abs:.2e} ({self.max_abs_rms:.2e} of the logit RMS), "
            f"mean abs {self.mean_abs:.2e}, cosine {self.cosine:.6f}, top-1 agreement {top1}{acc}"
        )


def as_outputs(result: object) -> list:
    """A model's or runner's result as a list of outputs: a classifier's one logits array, a backbone's maps."""
    return list(result) if isinstance(result, (list, tuple)) else [result]


def reference(model: torch.nn.Module, x: np.ndarray, chunk: int = 32) -> np.ndarray:
    """Logits of the original, un-reparameterized model."""
    (logits,) = feature_reference(model, x, chunk)
    return logits


def run(runner, x: np.ndarray, chunk: int = 32) -> np.ndarray:
    """Feed `x` through a runner in chunks of its fixed batch (padding the last) or `chunk`."""
    (logits,) = run_features(runner, x, chunk)
    return logits


def check(runner, x: np.ndarray, ref: np.ndarray, tol: Tolerance, labels: np.ndarray | None = None) -> ParityReport:
    """Run `x` through `runner` and judge it against `ref`, recording what ran; the runner is closed either way."""
    try:
        report = compare(ref, run(runner, x), tol, labels)
        report.ran = dict(runner.info)
    finally:
        runner.close()
    return report


def compare(ref: np.ndarray, out: np.ndarray, tol: Tolerance, labels: np.ndarray | None = None) -> ParityReport:
    """Error statistics of `out` against `ref` and the failures against `tol`."""
    stats = ParityStats()
    stats.add(ref, out, labels)
    return stats.report(tol)


class ParityStats:
    """The figures of a ParityReport, accumulated batch by batch (the gate streams its images).

    Maxima, minima and counts are exact; the mean error and the logit RMS are float64 sums, equal to the
    whole-array figures to ~1e-15 relative. NaN propagates as it would in one array."""

    def __init__(self) -> None:
        self.n = 0
        self.out_n = 0
        self.mismatch: tuple[tuple, tuple] | None = None  # (output, reference) shapes past the batch axis
        self.max_abs = self.max_rel = 0.0
        self.cosine = float("inf")
        self.sum_abs = self.sum_sq = 0.0
        self.values = 0  # logits seen: images x classes
        self.classes = 0
        self.top1 = self.top5 = 0
        self.labelled = 0
        self.hits = self.ref_hits = 0
        self.finite = True

    def add(self, ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None = None) -> None:
        self.n += len(ref)
        self.out_n += len(out)
        if self.mismatch is not None or out.shape != ref.shape:
            self.mismatch = self.mismatch or (out.shape[1:], ref.shape[1:])
            return
        diff = np.abs(out.astype(np.float64) - ref)
        scale = np.abs(ref).max(axis=1, keepdims=True) + 1e-12
        cos = np.sum(out * ref, axis=1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
        top1_ref = ref.argmax(1)
        self.max_abs = float(np.maximum(self.max_abs, diff.max()))  # np.maximum/minimum keep a NaN
        self.max_rel = float(np.maximum(self.max_rel, (diff / scale).max()))
        self.cosine = float(np.minimum(self.cosine, cos.min()))
        self.sum_abs += float(diff.sum())
        self.sum_sq += float(np.sum(np.square(ref, dtype=np.float64)))
        self.values += diff.size
        self.classes = ref.shape[1]
        self.top1 += int(np.sum(out.argmax(1) == top1_ref))
        self.top5 += int(np.sum(np.any(np.argsort(-out, axis=1)[:, :5] == top1_ref[:, None], axis=1)))
        if labels is not None:
            self.labelled += len(labels)
            self.ref_hits += int(np.sum(top1_ref == labels))
            self.hits += int(np.sum(out.argmax(1) == labels))
        self.finite = self.finite and bool(np.isfinite(out).all())

    def report(self, tol: Tolerance) -> ParityReport:
        """The figures so far and the failures against `tol`."""
        if self.mismatch is not None:
            (out_shape, ref_shape), nan = self.mismatch, float("nan")
            shapes = f"output shape {(self.out_n, *out_shape)} != reference {(self.n, *ref_shape)}"
            return ParityReport(self.n, nan, nan, nan, nan, nan, nan, None, None, tol.model_dump(), [shapes])
        n, classes = self.n, self.classes
        labelled = self.labelled == n and n > 0
        rms = float(np.sqrt(self.sum_sq / self.values))
        report = ParityReport(
            n=n,
            max_abs=self.max_abs,
            mean_abs=self.sum_abs / self.values,
            max_rel=self.max_rel,
            cosine=self.cosine,
            top1=self.top1 / n if classes > 1 else None,
            top5=self.top5 / n if classes > 5 else None,
            ref_accuracy=self.ref_hits / n if labelled else None,
            accuracy=self.hits / n if labelled else None,
            tolerance=tol.model_dump(),
            max_abs_rms=scaled_error(self.max_abs, rms),
        )
        max_abs = self.max_abs
        if not self.finite:
            report.failures.append("non-finite outputs")
        if tol.atol is not None and not max_abs <= tol.atol:
            report.failures.append(f"max abs error {max_abs:.3g} > atol {tol.atol:g}")
        if tol.max_abs_rms is not None and not report.max_abs_rms <= tol.max_abs_rms:
            report.failures.append(
                f"max abs error {max_abs:.3g} is {report.max_abs_rms:.3g} x the logit RMS > {tol.max_abs_rms:g}"
            )
        if classes == 1:
            # One logit: top-1 cannot disagree, and cosine is only the logit's sign, which flips on any image whose
            # logit sits near 0 (healthy INT8 of a 1-class digits T0: cosine -1). The error bounds carry the gate.
            report.not_applicable += ["cosine (1 class: only the sign)", "top-1 agreement (1 class)"]
            return report
        if tol.min_cosine is not None and not report.cosine >= tol.min_cosine:
            report.failures.append(f"worst cosine {report.cosine:.6f} < {tol.min_cosine:g}")
        if tol.min_top1 is not None and not report.top1 >= tol.min_top1:
            report.failures.append(f"top-1 agreement {report.top1:.2%} < {tol.min_top1:.0%}")
        return report


def scaled_error(max_abs: float, rms: float) -> float:
    """`max_abs` in units of `rms`, the reference logits' RMS over every image and class.

    The RMS, not a per-image max: one image whose logits sit near 0 (common for 1- and 2-class heads) would
    make a per-image ratio huge for a healthy artifact. Logits scaled by k are off by (k-1)x every logit,
    so 5x logits score at least 4, whatever cosine and top-1 say."""
    return max_abs / rms if rms > 0 else (0.0 if max_abs == 0 else float("inf"))


def label_map(
    model_labels: list[str] | None, num_classes: int, classes: list[str] | None, source: str
) -> np.ndarray | None:
    """Folder class index -> model class index, when the folder's classes can be matched to the model's."""
    if classes is None:
        return None
    if model_labels:
        unknown = sorted(set(classes) - set(model_labels))
        if not unknown:
            return np.array([model_labels.index(c) for c in classes])
        why = f"its class folders {_few(unknown)} are not among the model's labels ({_few(model_labels)})"
    elif len(classes) == num_classes:
        return np.arange(num_classes)
    else:
        why = f"it has {len(classes)} class folders for a {num_classes}-class model (and the model names none)"
    log.warning("%s: %s, so accuracy is not computed", source, why)
    return None


def labels_for(model_labels: list[str] | None, num_classes: int, data) -> np.ndarray | None:
    """An in-memory set's labels as model class indices (see label_map)."""
    mapping = label_map(model_labels, num_classes, data.classes, data.source)
    return None if mapping is None or data.labels is None else mapping[data.labels]


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


@dataclass
class OutputParity:
    """One backbone output's errors over every image: max abs, max abs over the output's largest reference
    magnitude, mean abs, the worst per-image cosine (each image's map flattened), and its verdict."""

    name: str
    shape: list[int]
    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class FeatureReport:
    """A backbone artifact against the reference, output by output; it fails if any output fails."""

    n: int
    outputs: list[OutputParity]
    tolerance: dict
    failures: list[str] = field(default_factory=list)
    ran: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    def __bool__(self) -> bool:
        return self.passed

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=float("nan"))

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=float("nan"))

    @property
    def cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=float("nan"))

    def to_dict(self) -> dict:
        return asdict(self) | {
            "kind": "backbone",
            "passed": self.passed,
            "outputs": [asdict(o) | {"passed": o.passed} for o in self.outputs],
        }

    def summary(self) -> str:
        parts = [
            f"{o.name} max abs {o.max_abs:.2e} (rel {o.max_rel:.2e}), cosine {o.cosine:.6f} "
            f"{'PASS' if o.passed else 'FAIL'}"
            for o in self.outputs
        ]
        return f"{self.n} images: " + "; ".join(parts)


@torch.no_grad()
def feature_reference(model: torch.nn.Module, x: np.ndarray, chunk: int = 32) -> list[np.ndarray]:
    """Every output of the original, un-reparameterized model (a backbone's four), each over every image."""
    model.eval()
    parts = [[o.numpy() for o in as_outputs(model(torch.from_numpy(part)))] for part, _ in batches(x, chunk)]
    return [np.concatenate(out) for out in zip(*parts, strict=True)]


def run_features(runner, x: np.ndarray, chunk: int = 32) -> list[np.ndarray]:
    """Feed `x` through a runner in chunks of its fixed batch (padding the last) or `chunk`: every output."""
    size = runner.batch or chunk
    parts = [
        [np.asarray(o, dtype=np.float32)[:n] for o in as_outputs(runner(part))]
        for part, n in batches(x, size, pad=bool(runner.batch))
    ]
    return [np.concatenate(out) for out in zip(*parts, strict=True)]


def check_features(runner, x: np.ndarray, ref: list[np.ndarray], tol: Tolerance, names: list[str]) -> FeatureReport:
    """Run `x` through a backbone runner and judge each output against `ref`; the runner is closed either way."""
    try:
        report = compare_features(ref, run_features(runner, x), tol, names)
        report.ran = dict(runner.info)
    finally:
        runner.close()
    return report


def compare_features(ref: list[np.ndarray], out: list[np.ndarray], tol: Tolerance, names: list[str]) -> FeatureReport:
    """Per-output error statistics of `out` against `ref` and the failures against `tol`."""
    stats = FeatureStats(names)
    stats.add(ref, out)
    return stats.report(tol)


class FeatureStats:
    """A FeatureReport's figures accumulated batch by batch, per output: exact maxima and minima (max abs, the
    reference's largest magnitude, worst per-image cosine) and a float64 sum for the mean error."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.n = 0
        self.problem: str | None = None  # a wrong output count or shape: reported instead of figures
        self.shapes: list[list[int]] = [[] for _ in names]
        self.max_abs = [0.0] * len(names)
        self.ref_max = [0.0] * len(names)
        self.cosine = [float("inf")] * len(names)
        self.sum_abs = [0.0] * len(names)
        self.values = [0] * len(names)
        self.finite = [True] * len(names)

    def add(self, ref: list[np.ndarray], out: list[np.ndarray]) -> None:
        self.n += len(ref[0])
        if self.problem is not None:
            return
        if len(out) != len(ref):
            self.problem = f"{len(out)} outputs, the reference has {len(ref)} ({', '.join(self.names)})"
            return
        for i, (r, o) in enumerate(zip(ref, out, strict=True)):
            if o.shape != r.shape:
                self.problem = f"{self.names[i]}: shape {list(o.shape)} != reference {list(r.shape)}"
                return
            diff = np.abs(o.astype(np.float64) - r)
            a, b = o.reshape(len(o), -1).astype(np.float64), r.reshape(len(r), -1).astype(np.float64)
            cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
            self.shapes[i] = list(o.shape[1:])
            self.max_abs[i] = float(np.maximum(self.max_abs[i], diff.max()))  # np.maximum keeps a NaN
            self.ref_max[i] = max(self.ref_max[i], float(np.abs(r).max()))
            self.cosine[i] = float(np.minimum(self.cosine[i], cos.min()))
            self.sum_abs[i] += float(diff.sum())
            self.values[i] += diff.size
            self.finite[i] = self.finite[i] and bool(np.isfinite(o).all())

    def report(self, tol: Tolerance) -> FeatureReport:
        report = FeatureReport(self.n, [], tol.model_dump())
        if self.problem is not None:
            report.failures.append(self.problem)
            return report
        for i, name in enumerate(self.names):
            max_abs, scale = self.max_abs[i], self.ref_max[i]
            result = OutputParity(
                name,
                [self.n, *self.shapes[i]],
                max_abs,
                max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf")),
                self.sum_abs[i] / max(self.values[i], 1),
                self.cosine[i],
            )
            if not self.finite[i]:
                result.failures.append("non-finite outputs")
            if tol.atol is not None and not max_abs <= tol.atol:
                result.failures.append(f"max abs error {max_abs:.3g} > atol {tol.atol:g}")
            if tol.max_rel is not None and not result.max_rel <= tol.max_rel:
                result.failures.append(
                    f"max abs error {max_abs:.3g} is {result.max_rel:.3g} of the output's range > {tol.max_rel:g}"
                )
            if tol.min_cosine is not None and not result.cosine >= tol.min_cosine:
                result.failures.append(f"worst cosine {result.cosine:.6f} < {tol.min_cosine:g}")
            report.outputs.append(result)
            report.failures += [f"{name}: {f}" for f in result.failures]
        return report


# A layer "diverges" when its output differs from PyTorch's by more than this fraction of its range.
LOCALIZE_REL = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 3e-2}
LOCALIZE_REL_DEFAULT = 0.1  # quantized: INT8 layers sit at ~1-3% each when healthy


def localize(model: torch.nn.Module, onnx_path, x: np.ndarray, precision: str) -> dict:
    """Name the first Conv/Gemm (by PyTorch module name) whose ONNX output diverges from PyTorch's."""
    import onnx
    import onnxruntime as ort

    graph = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    g = graph.graph
    inits = {i.name for i in g.initializer}
    producer = {out: node for node in g.node for out in node.output}

    def weight_name(tensor: str) -> str | None:
        # Follow DequantizeLinear/Cast back to the initializer, whose name is the PyTorch parameter's.
        while (
            tensor not in inits
            and tensor in producer
            and producer[tensor].op_type in ("DequantizeLinear", "Cast", "Identity")
        ):
            tensor = producer[tensor].input[0]
        tensor = tensor.removesuffix("_quantized")
        return tensor if tensor.endswith(".weight") else None

    layers = []
    for node in g.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            name = weight_name(node.input[1])
            if name:
                layers.append((name.removesuffix(".weight"), node.output[0], node.name or node.op_type))
    known = {v.name: v for v in (*g.value_info, *g.output)}
    del g.output[:]
    for _, tensor, _ in layers:
        g.output.append(known.get(tensor) or onnx.helper.make_empty_tensor_value_info(tensor))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)})

    folded = reparameterize(model, "split_cat")
    modules = dict(folded.named_modules())
    captured: dict[str, np.ndarray] = {}
    hooks = [
        modules[name].register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o.detach().numpy()))
        for name, _, _ in layers
        if name in modules
    ]
    with torch.no_grad():
        folded(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    limit = LOCALIZE_REL.get(precision, LOCALIZE_REL_DEFAULT)
    per_layer = []
    for (name, tensor, node), out in zip(layers, outs, strict=True):
        if name not in captured:
            continue
        ref = captured[name].reshape(out.shape)
        rel = float(np.abs(out.astype(np.float64) - ref).max() / (np.abs(ref).max() + 1e-12))
        per_layer.append({"module": name, "onnx_node": node, "onnx_tensor": tensor, "rel_error": rel})
    first = next((row for row in per_layer if row["rel_error"] > limit), None)
    return {"first_divergent": first, "threshold_rel": limit, "layers": per_layer}
