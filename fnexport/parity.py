"""Does an artifact compute what the PyTorch model computes? Numbers, thresholds and the verdict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from fnexport.recipes import Tolerance

# FP32 is judged by absolute logit error; reduced precisions by direction and agreement, since
# their max error grows with logit scale while what users see (the top class) should not change.
DEFAULTS: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-3, min_cosine=0.99999),
    "fp16": Tolerance(min_cosine=0.999, min_top1=0.98),
    "bf16": Tolerance(min_cosine=0.995, min_top1=0.95),
    "int8": Tolerance(min_cosine=0.98, min_top1=0.95),
    "int4": Tolerance(min_cosine=0.9, min_top1=0.8),
    "palettize8": Tolerance(min_cosine=0.98, min_top1=0.95),
    "palettize4": Tolerance(min_cosine=0.9, min_top1=0.8),
}


def tolerance_for(precision: str, override: Tolerance | None = None) -> Tolerance:
    base = DEFAULTS[precision]
    if override is None:
        return base
    return base.model_copy(update={k: v for k, v in override.model_dump().items() if v is not None})


@dataclass
class ParityReport:
    """Errors of one artifact against the reference on the same inputs, and the verdict."""

    n: int
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    top1: float
    top5: float
    ref_accuracy: float | None
    accuracy: float | None
    tolerance: dict
    failures: list[str] = field(default_factory=list)
    ran: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}

    def summary(self) -> str:
        acc = "" if self.accuracy is None else f", accuracy {self.accuracy:.2%} (ref {self.ref_accuracy:.2%})"
        return (
            f"{self.n} images: max abs {self.max_abs:.2e}, mean abs {self.mean_abs:.2e}, "
            f"cosine {self.cosine:.6f}, top-1 agreement {self.top1:.2%}{acc}"
        )


@torch.no_grad()
def reference(model: torch.nn.Module, x: np.ndarray, chunk: int = 32) -> np.ndarray:
    """Logits of the original, un-reparameterized model."""
    model.eval()
    return np.concatenate([model(torch.from_numpy(x[i : i + chunk])).numpy() for i in range(0, len(x), chunk)])


def run(runner, x: np.ndarray, chunk: int = 32) -> np.ndarray:
    """Feed `x` through a runner in chunks of its fixed batch (padding the last) or `chunk`."""
    size = runner.batch or chunk
    outs = []
    for i in range(0, len(x), size):
        part = x[i : i + size]
        n = len(part)
        if runner.batch and n < size:
            part = np.concatenate([part, np.repeat(part[-1:], size - n, axis=0)])
        outs.append(np.asarray(runner(part), dtype=np.float32)[:n])
    return np.concatenate(outs)


def compare(ref: np.ndarray, out: np.ndarray, tol: Tolerance, labels: np.ndarray | None = None) -> ParityReport:
    """Error statistics of `out` against `ref` and the failures against `tol`."""
    if out.shape != ref.shape:
        return ParityReport(
            len(ref),
            *([float("nan")] * 6),
            None,
            None,
            tol.model_dump(),
            [f"output shape {out.shape} != reference {ref.shape}"],
        )
    diff = np.abs(out.astype(np.float64) - ref)
    max_abs = float(diff.max())
    scale = np.abs(ref).max(axis=1, keepdims=True) + 1e-12
    cos = np.sum(out * ref, axis=1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
    top1_ref = ref.argmax(1)
    k = min(5, ref.shape[1])
    top5_hit = np.any(np.argsort(-out, axis=1)[:, :k] == top1_ref[:, None], axis=1)
    report = ParityReport(
        n=len(ref),
        max_abs=max_abs,
        mean_abs=float(diff.mean()),
        max_rel=float((diff / scale).max()),
        cosine=float(cos.min()),
        top1=float(np.mean(out.argmax(1) == top1_ref)),
        top5=float(np.mean(top5_hit)),
        ref_accuracy=None if labels is None else float(np.mean(top1_ref == labels)),
        accuracy=None if labels is None else float(np.mean(out.argmax(1) == labels)),
        tolerance=tol.model_dump(),
    )
    if not np.isfinite(out).all():
        report.failures.append("non-finite outputs")
    if tol.atol is not None and not max_abs <= tol.atol:
        report.failures.append(f"max abs error {max_abs:.3g} > atol {tol.atol:g}")
    if tol.min_cosine is not None and not report.cosine >= tol.min_cosine:
        report.failures.append(f"worst cosine {report.cosine:.6f} < {tol.min_cosine:g}")
    if tol.min_top1 is not None and not report.top1 >= tol.min_top1:
        report.failures.append(f"top-1 agreement {report.top1:.2%} < {tol.min_top1:.0%}")
    return report
