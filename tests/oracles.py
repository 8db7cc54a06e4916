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


def masked_linear_oracle(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
                         grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """y = x (W⊙M)^T + b and its gradients in closed form, in float64 with numpy: dX = dY (W⊙M), dW = (dY^T x)⊙M,
    db = sum of dY over the rows; W⊙M keeps W where the mask is set and is 0 elsewhere, even where W is not finite.
    Also `*_terms`: the same sums over absolute values (sum |a b| per output, the bias included), the scale of any
    summation's rounding error. x, grad_out: [..., I] and [..., O]."""
    keep = mask.detach().cpu().numpy()
    wm = np.where(keep, weight.detach().cpu().double().numpy(), 0.0)
    a = x.detach().cpu().double().numpy().reshape(-1, wm.shape[1])
    g = grad_out.detach().cpu().double().numpy().reshape(-1, wm.shape[0])
    b = 0.0 if bias is None else bias.detach().cpu().double().numpy()
    out = {"y": a @ wm.T + b, "dx": g @ wm, "dw": np.where(keep, g.T @ a, 0.0), "db": g.sum(axis=0),
           "y_terms": np.abs(a) @ np.abs(wm).T + np.abs(b), "dx_terms": np.abs(g) @ np.abs(wm),
           "dw_terms": np.abs(g).T @ np.abs(a), "db_terms": np.abs(g).sum(axis=0)}
    shapes = {"y": (*x.shape[:-1], wm.shape[0]), "dx": x.shape, "dw": weight.shape, "db": (wm.shape[0],)}
    return {k: torch.from_numpy(np.ascontiguousarray(v)).reshape(shapes[k.split("_")[0]]) for k, v in out.items()}


def _conv_patches(xp: np.ndarray, kh: int, kw: int, out_hw: tuple[int, int], stride, dilation) -> np.ndarray:
    """The input positions kernel tap (kh, kw) meets for every output position: [N, C, OH, OW]."""
    rows, cols = _tap_slices(kh, kw, out_hw, stride, dilation)
    return xp[:, :, rows, cols]


def _tap_slices(kh: int, kw: int, out_hw: tuple[int, int], stride, dilation) -> tuple[slice, slice]:
    h0, w0 = kh * dilation[0], kw * dilation[1]
    return (slice(h0, h0 + stride[0] * (out_hw[0] - 1) + 1, stride[0]),
            slice(w0, w0 + stride[1] * (out_hw[1] - 1) + 1, stride[1]))


def masked_conv2d_oracle(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
                         grad_out: torch.Tensor, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                         groups: int = 1) -> dict[str, torch.Tensor]:
    """conv2d(x, W⊙M, b) and its gradients in float64 with numpy, tap by tap (no im2col, no torch convolution):
    y[n, o] += sum_c x_pad[n, c, oh*s + kh*d, ow*s + kw*d] Wm[o, c, kh, kw] per group; dW the same sums against
    dY, masked; dX each tap's products added back at the positions it read. `*_terms`: the same sums over absolute
    values (the bias included). Symmetric integer padding (pairs)."""
    keep = mask.detach().cpu().numpy()
    wm = np.where(keep, weight.detach().cpu().double().numpy(), 0.0)
    a = x.detach().cpu().double().numpy()
    g = grad_out.detach().cpu().double().numpy()
    N, C, H, W = a.shape
    OC, Cg, KH, KW = wm.shape
    OCg = OC // groups
    (ph, pw), out_hw = padding, g.shape[2:]
    xp = np.pad(a, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    res = {k: np.zeros(s) for k, s in (("y", g.shape), ("y_terms", g.shape), ("dw", wm.shape),
                                        ("dw_terms", wm.shape), ("dxp", xp.shape), ("dx_terms", xp.shape))}
    for gi, kh, kw in ((gi, kh, kw) for gi in range(groups) for kh in range(KH) for kw in range(KW)):
        cs, os_ = slice(gi * Cg, (gi + 1) * Cg), slice(gi * OCg, (gi + 1) * OCg)
        patch = _conv_patches(xp, kh, kw, out_hw, stride, dilation)[:, cs]
        tap = wm[os_, :, kh, kw]
        res["y"][:, os_] += np.einsum("nchw,oc->nohw", patch, tap)
        res["y_terms"][:, os_] += np.einsum("nchw,oc->nohw", np.abs(patch), np.abs(tap))
        res["dw"][os_, :, kh, kw] = np.einsum("nohw,nchw->oc", g[:, os_], patch)
        res["dw_terms"][os_, :, kh, kw] = np.einsum("nohw,nchw->oc", np.abs(g[:, os_]), np.abs(patch))
        rows, cols = _tap_slices(kh, kw, out_hw, stride, dilation)
        res["dxp"][:, cs, rows, cols] += np.einsum("nohw,oc->nchw", g[:, os_], tap)
        res["dx_terms"][:, cs, rows, cols] += np.einsum("nohw,oc->nchw", np.abs(g[:, os_]), np.abs(tap))
    if bias is not None:  # the bias is one more term of each output's sum
        res["y"] += bias.detach().cpu().double().numpy()[None, :, None, None]
        res["y_terms"] += np.abs(bias.detach().cpu().double().numpy())[None, :, None, None]
    out = {"y": res["y"], "y_terms": res["y_terms"], "dw": np.where(keep, res["dw"], 0.0), "dw_terms": res["dw_terms"],
           "dx": res["dxp"][:, :, ph:ph + H, pw:pw + W], "dx_terms": res["dx_terms"][:, :, ph:ph + H, pw:pw + W],
           "db": g.sum(axis=(0, 2, 3)), "db_terms": np.abs(g).sum(axis=(0, 2, 3))}
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
