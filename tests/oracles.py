"""Independent oracles for the ops' tests: the formulas themselves in float64 (and numpy), written apart from
dsd2.ops' reference implementations so that those are checked too, not taken as their own expected values."""

from __future__ import annotations

import numpy as np
import torch


def positive_counts_oracle(x: torch.Tensor, per_channel: bool = False, inclusive: bool = False) -> torch.Tensor:
    """Exact on-state counts over the samples (axis 0), computed by numpy on a float64 copy: per element of a
    sample, or per channel (axis 1) pooling every other axis; `inclusive` counts x >= 0 (so -0.0 too)."""
    a = x.detach().cpu().double().numpy()
    if a.ndim == 1:
        a = a[:, None]
    on = np.greater_equal(a, 0.0) if inclusive else np.greater(a, 0.0)
    if per_channel:
        counts = np.moveaxis(on, 1, 0).reshape(a.shape[1], -1).sum(axis=1)
    else:
        counts = on.reshape(a.shape[0], -1).sum(axis=0)
    return torch.from_numpy(counts.astype(np.int64))


def _log_softmax(z: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax by hand: shift by the row maximum, log of the summed exponentials."""
    shifted = z - z.max(dim=1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=1, keepdim=True).log()


def kd_loss_oracle(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, *, alpha: float = 0.8,
                   temperature: float = 10.0, ignore_index: int = -100) -> tuple[torch.Tensor, ...]:
    """(loss, ce, kl, grad) of DSD² eq. 2 in float64, on the CPU, with the gradient in closed form (no autograd):

        d loss / d s = [(1 - alpha) (softmax(s) - onehot(y)) + alpha tau (softmax(s / tau) - softmax(t / tau))] / n

    on the n kept rows (target != ignore_index), 0 on ignored ones; a teacher probability of 0 adds 0 to the KL."""
    s, t, y = student.detach().cpu().double(), teacher.detach().cpu().double(), target.cpu()
    kept = y != ignore_index
    n = max(int(kept.sum()), 1)
    grad = torch.zeros_like(s)
    if not bool(kept.any()):
        zero = torch.zeros((), dtype=torch.float64)
        return zero, zero, zero, grad
    s, t, y = s[kept], t[kept], y[kept]
    log_softmax_s = _log_softmax(s)
    ce = -log_softmax_s.gather(1, y[:, None]).sum() / n
    log_q, log_p = _log_softmax(s / temperature), _log_softmax(t / temperature)
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum() / n
    loss = (1 - alpha) * ce + alpha * temperature**2 * kl
    onehot = torch.nn.functional.one_hot(y, s.shape[1]).double()
    grad[kept] = ((1 - alpha) * (log_softmax_s.exp() - onehot) + alpha * temperature * (log_q.exp() - p)) / n
    return loss, ce, kl, grad
