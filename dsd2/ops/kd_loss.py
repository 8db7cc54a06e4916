"""Knowledge-distillation loss (DSD² eq. 2) as one fused op: forward writes the gradient, backward scales it.

    L = (1 - alpha) * CE(s, y) + alpha * tau^2 * KL(softmax(t / tau) || softmax(s / tau))

both terms averaged over the rows whose target is not `ignore_index` (batchmean for the KL). Differentiable in
the student logits only. A teacher logit of -inf is probability 0 and contributes 0 to the KL, where eager
`kl_div` returns NaN. Inputs may be float32, float16 or bfloat16; all math is fp32. The op never reads a value
back to the host, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dsd2.ops._backend import cpp_extension, pick

FP32_EPS = 2.0**-24  # unit roundoff of fp32, the precision of every backend's math
# storing the gradient in the input dtype: one ulp (the Triton interpreter truncates where hardware rounds)
STORE_EPS = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 0.0}


def kd_tolerances(dtype: torch.dtype, classes: int) -> tuple[float, float]:
    """(loss, gradient) tolerances of every backend against the float64 reference, the same at every CPU level:
    the loss relative to max(|loss|, 1), the gradient relative to its largest entry.

    The math is fp32 (exp and log polynomials within ~4 units of roundoff); a row's sums run over its C classes,
    in 16 fixed lanes folded into double every 256 classes on the CPU, so the error grows like sqrt(min(C, 256))
    and no further. The loss takes a further factor for the cancellation in KL = sum p (t - s)/T - lse(t/T) +
    lse(s/T); the gradient is also rounded to the input dtype."""
    growth = math.sqrt(min(classes, 256))
    return FP32_EPS * 16 * (4 + growth), FP32_EPS * (8 + growth) + STORE_EPS[dtype]


def kd_loss_reference(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, *, alpha: float = 0.8,
                      temperature: float = 10.0, ignore_index: int = -100) -> tuple[torch.Tensor, ...]:
    """The oracle in plain PyTorch (differentiable by autograd): every backend, the selftest and the benchmarks'
    eager baseline are measured against it. Returns (loss, ce, kl)."""
    dtype = torch.promote_types(student.dtype, torch.float32)  # fp32 math, float64 stays float64
    s, t = student.to(dtype), teacher.detach().to(dtype)
    valid = target != ignore_index
    n = valid.sum().clamp_min(1)
    ce_rows = F.cross_entropy(s, target, reduction="none", ignore_index=ignore_index)
    log_q = F.log_softmax(s / temperature, dim=1)
    p = F.softmax(t / temperature, dim=1)
    log_p = F.log_softmax(t / temperature, dim=1)
    kl_terms = torch.where(p > 0, p * (log_p - log_q), 0.0)  # p = 0 (a teacher logit of -inf) adds 0, not NaN
    kl_rows = torch.where(valid, kl_terms.sum(1), 0.0)  # an ignored row may hold inf or NaN logits
    ce, kl = ce_rows.sum() / n, kl_rows.sum() / n
    loss = (1 - alpha) * ce + alpha * temperature**2 * kl
    return loss, ce, kl


def kd_loss_eager(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, *, alpha: float = 0.8,
                  temperature: float = 10.0) -> torch.Tensor:
    """The KD loss as pruning code usually writes it (no ignored rows, `kl_div` with batchmean): the baseline our
    fused op is timed against in the benchmarks and the selftest. Not an oracle: it has no -inf or ignore-index
    handling; a test checks that it equals `kd_loss_reference` on ordinary logits."""
    ce = F.cross_entropy(student, target)
    kl = F.kl_div(F.log_softmax(student / temperature, 1), F.softmax(teacher / temperature, 1), reduction="batchmean")
    return (1 - alpha) * ce + alpha * temperature**2 * kl


def _forward_reference(student, teacher, target, alpha, temperature, ignore_index):
    with torch.enable_grad():
        s = student.detach().requires_grad_(True)
        loss, ce, kl = kd_loss_reference(s, teacher, target, alpha=alpha, temperature=temperature,
                                         ignore_index=ignore_index)
        (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), ce.detach(), kl.detach(), grad


def kd_loss_forward(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float,
                    temperature: float, ignore_index: int, backend: str | None = None) -> tuple[torch.Tensor, ...]:
    """(loss, ce, kl, grad) from `backend`, or the one `dsd2.ops.pick` chooses for the student's device."""
    backend = pick("kd_loss", student, backend, extension=cpp_extension)
    if backend == "triton":
        from dsd2.kernels.kd_loss import kd_loss_forward as triton_forward

        return triton_forward(student, teacher, target, alpha, temperature, ignore_index)
    if backend == "cpp":
        ext = cpp_extension()
        if ext is not None:
            return tuple(ext.kd_loss_forward(student, teacher, target, alpha, temperature, ignore_index))
    return _forward_reference(student, teacher, target, alpha, temperature, ignore_index)


class KDLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, target, alpha, temperature, ignore_index, backend):
        backend = pick("kd_loss", student, backend, extension=cpp_extension)
        loss, ce, kl, grad = kd_loss_forward(student, teacher, target, alpha, temperature, ignore_index, backend)
        ctx.cpp = backend == "cpp" and cpp_extension() is not None
        ctx.triton = backend == "triton"
        ctx.scaled = False
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        (grad,) = ctx.saved_tensors
        if ctx.cpp and not grad_loss.requires_grad:
            # returns the saved gradient itself for loss.backward()'s 1: a fresh B x C product would cost an
            # allocation and its page faults, about a third of the op's time at B = 8192, C = 100
            return cpp_extension().kd_loss_backward(grad, grad_loss), None, None, None, None, None, None
        if ctx.triton and not grad_loss.requires_grad:
            # scaled in place by a kernel that reads grad_loss on the device (no sync inside a CUDA graph) and moves
            # no data for loss.backward()'s 1; a second backward would see the scaled gradient, so it is refused
            if ctx.scaled:
                raise RuntimeError("kd_loss: the Triton backend supports one backward per forward; compute the loss "
                                   "again instead of retain_graph=True")
            ctx.scaled = True
            from dsd2.kernels.kd_loss import kd_scale_grad_

            return kd_scale_grad_(grad, grad_loss), None, None, None, None, None, None
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *,
            alpha: float = 0.8, temperature: float = 10.0, ignore_index: int = -100, return_parts: bool = False,
            backend: str | None = None):
    """Fused KD loss. With `return_parts`, returns (loss, ce, kl) with ce and kl detached (kl unscaled)."""
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits must both be [B, C]; got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature {temperature} must be > 0")
    loss, ce, kl = KDLossFunction.apply(student_logits, teacher_logits.detach(), target, float(alpha),
                                        float(temperature), int(ignore_index), backend)
    return (loss, ce, kl) if return_parts else loss
