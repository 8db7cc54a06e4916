"""kd_loss: every backend (the plain-PyTorch reference included) against independent float64 formulas and
hand-computed cases; gradcheck; fuzz."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import triton_device
from hypothesis import given, settings
from hypothesis import strategies as st
from isa_levels import per_level
from oracles import kd_loss_oracle

from dsd2.ops import kd_loss, kd_loss_eager, kd_loss_reference
from dsd2.ops.kd_loss import STORE_EPS
from dsd2.ops.kd_loss import kd_tolerances as tolerances

SIZES = [(1, 2), (3, 10), (17, 100), (5, 1000), (2, 4097)]
TRITON_SIZES = [(1, 2), (3, 10), (9, 100), (2, 1000)]


def device_for(backend):
    return triton_device() if backend == "triton" else "cpu"


def inputs(b, c, dtype, seed=0, device="cpu", scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(b, c, generator=g) * scale).to(dtype)
    t = (torch.randn(b, c, generator=g) * scale).to(dtype)
    y = torch.randint(0, c, (b,), generator=g)
    return s.to(device), t.to(device), y.to(device)


def check(backend, s, t, y, **kw):
    rtol, gtol = tolerances(s.dtype, s.shape[1])
    a = s.clone().requires_grad_()
    loss, ce, kl = kd_loss(a, t, y, return_parts=True, backend=backend, **kw)
    loss.backward()
    ref, ref_ce, ref_kl, ref_grad = kd_loss_oracle(s, t, y, **kw)
    assert torch.isfinite(loss) and torch.isfinite(a.grad.float()).all()
    for got, want in ((loss, ref), (ce, ref_ce), (kl, ref_kl)):
        torch.testing.assert_close(got.cpu().double(), want, rtol=rtol, atol=rtol)
    scale = ref_grad.abs().max().clamp_min(1e-12)
    assert a.grad.dtype == s.dtype
    assert float((a.grad.cpu().double() - ref_grad).abs().max() / scale) <= gtol
    assert not ce.requires_grad and not kl.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b, c", SIZES)
def test_cpp_matches_the_oracle(cpu_isa_level, b, c, dtype):
    check("cpp", *inputs(b, c, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b, c", TRITON_SIZES)
def test_triton_matches_the_oracle(b, c, dtype):
    check("triton", *inputs(b, c, dtype, device=triton_device()))


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton"))
def test_large_vocabulary_chunked(backend, cpu_isa_level):
    b = 3 if backend == "cpp" else 2
    check(backend, *inputs(b, 32768, torch.float32, device=device_for(backend)))


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
def test_non_contiguous_inputs(backend, cpu_isa_level):
    dev = device_for(backend)
    s, t, y = inputs(6, 40, torch.float32, device=dev)
    wide_s = torch.zeros(6, 80, device=dev)
    wide_s[:, ::2] = s
    check(backend, wide_s[:, ::2], t.t().contiguous().t(), y)


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
def test_extreme_and_minus_inf_logits(backend, cpu_isa_level):
    dev = device_for(backend)
    s, t, y = inputs(5, 10, torch.float32, device=dev)
    s[0] = 1e4
    s[0, 3] = -1e4
    t[1] = -1e4
    t[2, :4] = float("-inf")  # probability 0: contributes 0 to the KL
    check(backend, s, t, y)
    # the case eager gets wrong: the log of a zero teacher probability gives NaN
    p = F.softmax(t / 10, 1)
    assert torch.isnan(F.kl_div(F.log_softmax(s / 10, 1), p.log(), reduction="batchmean", log_target=True))


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
def test_ignore_index_rows_and_all_ignored(backend, cpu_isa_level):
    dev = device_for(backend)
    s, t, y = inputs(6, 10, torch.float32, device=dev)
    y[1] = y[4] = -100
    check(backend, s, t, y)
    a = s.clone().requires_grad_()
    loss = kd_loss(a, t, torch.full_like(y, -100), backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and bool((a.grad == 0).all())
    assert float(kd_loss(s, t, torch.full_like(y, 7), ignore_index=7, backend=backend)) == 0.0


def hand_loss_and_grad(backend, s, t, y, **kw):
    a = s.clone().requires_grad_()
    loss = kd_loss(a, t, y, backend=backend, **kw)
    loss.backward()
    return float(loss.detach()), a.grad.flatten().tolist()


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
def test_hand_computed_cases(backend, cpu_isa_level):
    """Losses and gradients worked out by hand, for every backend and for the oracle the other tests use."""
    dev = device_for(backend)
    s, y0, y1 = torch.zeros(1, 2, device=dev), torch.tensor([0], device=dev), torch.tensor([1], device=dev)
    # equal logits, alpha 0.8: CE = log 2, KL = 0; d/ds = 0.2 * (softmax(s) - onehot(0)) = 0.2 * (-0.5, 0.5)
    loss, grad = hand_loss_and_grad(backend, s, s, y0)
    assert loss == pytest.approx(0.2 * math.log(2), rel=1e-6) and grad == pytest.approx([-0.1, 0.1], abs=1e-7)
    # alpha = 1, tau = 1: p = (0.75, 0.25), q = (0.5, 0.5); d/ds = tau * (q - p) = (-0.25, 0.25)
    t = torch.tensor([[math.log(3.0), 0.0]], device=dev)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    loss, grad = hand_loss_and_grad(backend, s, t, y1, alpha=1.0, temperature=1.0)
    assert loss == pytest.approx(kl, rel=1e-5) and grad == pytest.approx([-0.25, 0.25], abs=1e-6)
    oracle = kd_loss_oracle(s.double(), torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64), y1, alpha=1.0,
                            temperature=1.0)
    assert float(oracle[0]) == pytest.approx(kl, rel=1e-12) and oracle[3].flatten().tolist() == pytest.approx(
        [-0.25, 0.25], abs=1e-12)
    # tau = 2 softens both distributions and scales the KL by tau^2: p = softmax(log 3 / 2, 0) = (r, 1 - r) with
    # r = sqrt 3 / (sqrt 3 + 1); d/ds = 0.5 * (0.5, -0.5) + 0.5 * 2 * (0.5 - r, r - 0.5)
    r = math.sqrt(3) / (math.sqrt(3) + 1)
    kl2 = r * math.log(r / 0.5) + (1 - r) * math.log((1 - r) / 0.5)
    loss, grad = hand_loss_and_grad(backend, s, t, y1, alpha=0.5, temperature=2.0)
    assert loss == pytest.approx(0.5 * math.log(2) + 0.5 * 4 * kl2, rel=1e-5)
    assert grad == pytest.approx([0.25 + 0.5 - r, -0.25 + r - 0.5], abs=1e-6)
    # two rows, the second ignored: the kept row alone, its gradient not halved, the ignored row's 0
    s2, t2 = torch.zeros(2, 2, device=dev), torch.cat([t, t]).to(dev)
    loss, grad = hand_loss_and_grad(backend, s2, t2, torch.tensor([1, -100], device=dev), alpha=1.0,
                                    temperature=1.0)
    assert loss == pytest.approx(kl, rel=1e-5) and grad == pytest.approx([-0.25, 0.25, 0.0, 0.0], abs=1e-6)


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("reference", "cpp"))
def test_gradcheck_float64(backend, cpu_isa_level):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 7, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(4, 7, dtype=torch.float64, generator=g)
    t[0, 2] = float("-inf")
    y = torch.tensor([0, 3, -100, 6])
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, t, y, backend=backend), (s,))


@pytest.mark.parametrize("c", [7, 300, 4097])
def test_cpp_float64_matches_the_oracle_to_double_precision(cpu_isa_level, c):
    """float64 runs the row kernel's template in double (the standard library's exp and log) at every level:
    loss, parts and gradient within a few units of double roundoff of the float64 formulas, teacher -inf and
    ignored rows included."""
    s, t, y = inputs(6, c, torch.float64, scale=5.0)
    t[1, ::3] = float("-inf")
    y[4] = -100
    a = s.clone().requires_grad_()
    got = kd_loss(a, t, y, return_parts=True, backend="cpp")
    *want, want_grad = kd_loss_oracle(s, t, y)
    got[0].backward()
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g.detach(), w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.grad, want_grad, rtol=0, atol=1e-13 * float(want_grad.abs().max()))
    assert bool((a.grad[4] == 0).all())


@pytest.mark.parametrize("alpha, temperature", [(0.8, 10.0), (0.0, 1.0), (1.0, 0.5), (0.3, 4.0)])
def test_reference_matches_the_float64_formulas(alpha, temperature):
    """`kd_loss_reference`, the oracle of the selftest and the benchmarks, equals the formulas to double precision
    in float64, loss, parts and its autograd gradient, teacher -inf and ignored rows included."""
    s, t, y = inputs(7, 300, torch.float64, seed=4, scale=5.0)
    t[2, ::4] = float("-inf")
    y[5] = -100
    r = s.clone().requires_grad_()
    got = kd_loss_reference(r, t, y, alpha=alpha, temperature=temperature)
    *want, want_grad = kd_loss_oracle(s, t, y, alpha=alpha, temperature=temperature)
    got[0].backward()
    for g, w in zip(got, want):
        torch.testing.assert_close(g.detach(), w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.grad, want_grad, rtol=0, atol=1e-13 * float(want_grad.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
def test_backward_scales_by_incoming_gradient(backend, cpu_isa_level, dtype):
    """A sum over the rows instead of the mean (loss * n), a data-parallel rescale (3), the usual 1 and 0: the Triton
    backward scales the saved gradient in place on the device, the others by a product."""
    dev = device_for(backend)
    s, t, y = inputs(4, 10, dtype, device=dev)
    b = s.clone().requires_grad_()
    kd_loss(b, t, y, backend=backend).backward()
    for scale in (4.0, 3.0, 1.0, 0.0):
        a = s.clone().requires_grad_()
        (scale * kd_loss(a, t, y, backend=backend)).backward()
        assert a.grad.dtype == dtype
        torch.testing.assert_close(a.grad.float(), (scale * b.grad.float()).to(dtype).float(), rtol=STORE_EPS[dtype],
                                   atol=0)


def test_triton_refuses_a_second_backward_through_the_scaled_gradient():
    s, t, y = inputs(4, 10, torch.float32, device=triton_device())
    a = s.clone().requires_grad_()
    loss = kd_loss(a, t, y, backend="triton")
    (2.0 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


def test_teacher_gets_no_gradient_and_bad_shapes_are_errors():
    s, t, y = inputs(4, 10, torch.float32)
    t.requires_grad_()
    a = s.clone().requires_grad_()
    kd_loss(a, t, y).backward()
    assert t.grad is None
    with pytest.raises(ValueError, match="must both be"):
        kd_loss(s, t[:, :5], y)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, t, y, temperature=0.0)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 9), c=st.integers(2, 300), alpha=st.floats(0, 1), tau=st.floats(0.5, 20),
       scale=st.floats(0.01, 50), seed=st.integers(0, 10_000))
def test_fuzz_cpp_against_the_oracle(cpu_isa_level, b, c, alpha, tau, scale, seed):
    s, t, y = inputs(b, c, torch.float32, seed=seed, scale=scale)
    rtol = 2e-5 * max(1.0, tau * tau)
    a = s.clone().requires_grad_()
    loss = kd_loss(a, t, y, alpha=alpha, temperature=tau, backend="cpp")
    loss.backward()
    ref, _, _, ref_grad = kd_loss_oracle(s, t, y, alpha=alpha, temperature=tau)
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=rtol)
    torch.testing.assert_close(a.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("c", [10, 300])
def test_ignored_rows_with_non_finite_logits_do_not_poison_the_loss(cpu_isa_level, c):
    """An ignored row contributes nothing, whatever it holds: the loss and the other rows' gradient equal those of
    the batch without it, and its own gradient is 0 (both the row-block path, C <= 128, and the row path)."""
    s, t, y = inputs(5, c, torch.float32)
    for bad in (float("inf"), float("-inf"), float("nan")):
        s2, y2 = s.clone(), y.clone()
        s2[2] = bad
        y2[2] = -100
        check_ignored_row(s, t, y, s2, t, y2, 2, "cpp")


def check_ignored_row(s, t, y, s2, t2, y2, row, backend):
    """The batch (s2, t2, y2), whose `row` is ignored and holds anything, gives the loss of (s, t, y) without that
    row, the same gradient on the other rows, and 0 on it."""
    a = s2.clone().requires_grad_()
    loss = kd_loss(a, t2, y2, backend=backend)
    loss.backward()
    keep = torch.tensor([i for i in range(len(y)) if i != row], device=s.device)
    b = s[keep].clone().requires_grad_()
    ref = kd_loss(b, t[keep], y[keep], backend=backend)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(a.grad[keep], b.grad)
    assert bool((a.grad[row] == 0).all())


def test_the_timing_baseline_computes_the_same_loss_as_the_oracle():
    """`kd_loss_eager` is what benchmarks and the selftest time ours against: it must be the same loss."""
    s, t, y = inputs(64, 37, torch.float64, seed=3)
    s.requires_grad_(True)
    eager = kd_loss_eager(s, t, y, alpha=0.7, temperature=4.0)
    ref, _, _, ref_grad = kd_loss_oracle(s, t, y, alpha=0.7, temperature=4.0)
    torch.testing.assert_close(eager.detach(), ref, rtol=1e-12, atol=0)
    (g_eager,) = torch.autograd.grad(eager, s)
    torch.testing.assert_close(g_eager, ref_grad, rtol=1e-10, atol=1e-14)


# The Triton launcher's three paths, reached at small sizes by shrinking its thresholds: the register tile; the
# persistent row kernel streaming over C in chunks (4 chunks of 32, the last partial; 4 programs for 6 rows, so two
# walk a second row); each row split over C (7 spans of 16, merged through an 8-lane vector with one lane masked).
TRITON_PATHS = {
    "tile": ({}, ["_kd_tile_kernel"]),
    "chunked": ({"TILE_MAX_C": 64, "CHUNK_C": 32, "SPLIT_MIN_PROGRAMS": 1, "H100_SMS": 4}, ["_kd_chunked_kernel"]),
    "split": ({"TILE_MAX_C": 64, "SPLIT_CHUNK_C": 16, "SPLIT_MIN_PROGRAMS": 1000},
              ["_kd_split_stats_kernel", "_kd_split_grad_kernel"]),
}


@pytest.fixture(params=list(TRITON_PATHS))
def triton_path(request, monkeypatch):
    kd = pytest.importorskip("dsd2.kernels.kd_loss")
    knobs, kernels = TRITON_PATHS[request.param]
    for name, value in knobs.items():
        monkeypatch.setattr(kd, name, value)
    meta = torch.empty(6, 100, device="meta")
    rows = torch.empty(6, device="meta")
    plan = kd.plan_kd(meta, meta, torch.empty(6, dtype=torch.int64, device="meta"), torch.empty((), device="meta"),
                      meta, rows, rows, 0.8, 10.0, -100)
    assert [launch.name for launch in plan] == kernels
    if request.param == "chunked":
        assert plan[0].grid == (4,)
    if request.param == "split":
        assert plan[0].grid == (6, 7) and plan[1].constexprs["SPLITS"] == 8
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_paths_match_the_oracle(triton_path, dtype):
    s, t, y = inputs(6, 100, dtype, seed=5, device=triton_device())
    y[4] = -100
    check("triton", s, t, y)


def test_triton_paths_extreme_logits(triton_path):
    """A common offset of 1e4, a teacher row at -1e4, a teacher -inf over whole chunks and spans (its first 40
    classes), an ignored row: every path agrees with the oracle."""
    s, t, y = inputs(6, 100, torch.float32, seed=6, device=triton_device())
    s[0] += 1e4
    s[0, 3] = -1e4
    t[0] += 1e4
    t[1] = -1e4
    t[2, :40] = float("-inf")
    y[3] = -100
    check("triton", s, t, y)


def test_triton_paths_ignored_rows_with_non_finite_logits(triton_path):
    """An ignored row holding inf and NaN adds nothing: loss and the other rows' gradient equal those of the batch
    without it, and its own gradient is 0."""
    s, t, y = inputs(6, 100, torch.float32, seed=9, device=triton_device())
    s2, t2, y2 = s.clone(), t.clone(), y.clone()
    s2[3, ::2] = float("inf")
    t2[3, 1::2] = float("nan")
    y2[3] = -100
    check_ignored_row(s, t, y, s2, t2, y2, 3, "triton")


@pytest.mark.parametrize("alpha, temperature", [(0.0, 1.0), (0.0, 4.0), (1.0, 1.0), (1.0, 4.0), (0.8, 0.5)])
def test_triton_paths_alpha_and_temperature_edges(triton_path, alpha, temperature):
    s, t, y = inputs(6, 100, torch.float32, seed=7, device=triton_device())
    check("triton", s, t, y, alpha=alpha, temperature=temperature)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_distillation_objective_passes_half_logits_through(cpu_isa_level, dtype):
    """bf16/fp16 student and teacher logits reach the fused op as they are: no fp32 copy of the [B, C] logits is
    made around it, and the gradient comes back in the student's dtype, equal to the oracle's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dsd2.training import DistillationObjective

    class WideCopies(TorchDispatchMode):
        found: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.dim() == 2:
                self.found.append(str(func))
            return out

    s, t, y = inputs(6, 37, dtype, seed=8)
    objective = DistillationObjective(torch.nn.Identity(), 0.8, 10.0, cached_logits=t)
    a = s.clone().requires_grad_()
    with WideCopies() as mode:
        loss = objective(a, y, None, torch.arange(6))
        loss.backward()
    assert mode.found == []
    assert a.grad.dtype == dtype
    ref, _, _, ref_grad = kd_loss_oracle(s, t, y)
    rtol, gtol = tolerances(dtype, 37)
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=rtol)
    assert float((a.grad.double() - ref_grad).abs().max() / ref_grad.abs().max()) <= gtol


@pytest.mark.parametrize("dtype, c, row_stride, align", [
    (torch.float32, 100, 100, 4), (torch.float32, 101, 101, 1), (torch.float32, 100, 102, 2),
    (torch.float32, 101, 104, 1), (torch.bfloat16, 100, 100, 4), (torch.bfloat16, 112, 112, 8),
    (torch.float16, 10, 10, 2)])
def test_tile_alignment_hint_divides_every_row_offset(dtype, c, row_stride, align):
    """The tile kernel tells the compiler that row offsets and C are multiples of ALIGN elements (for 16-byte
    vectors); a hint that is not true would read the wrong addresses on a GPU, so the planner must never claim more
    than every stride and C allow."""
    kd = pytest.importorskip("dsd2.kernels.kd_loss")
    s = torch.empty(8, row_stride, dtype=dtype, device="meta")[:, :c]
    rows = torch.empty(8, device="meta")
    (launch,) = kd.plan_kd(s, s, torch.empty(8, dtype=torch.int64, device="meta"), torch.empty((), device="meta"),
                           torch.empty(8, c, dtype=dtype, device="meta"), rows, rows, 0.8, 10.0, -100)
    assert launch.constexprs["ALIGN"] == align


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
@pytest.mark.parametrize("student_dtype, teacher_dtype", [
    (torch.bfloat16, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16)])
def test_half_and_mixed_logits_on_every_backend(backend, cpu_isa_level, student_dtype, teacher_dtype):
    """What the objective now passes as it is: a bf16/fp16 student with a teacher of its own dtype or another (fp32
    cached logits, a bf16 teacher under autocast); the gradient comes back in the student's dtype."""
    s, t, y = inputs(7, 37, student_dtype, seed=11, device=device_for(backend))
    check(backend, s, t.to(teacher_dtype), y)


@pytest.mark.parametrize("c, main", [(100, ["_kd_tile_kernel"]),
                                     (5000, ["_kd_split_stats_kernel", "_kd_split_grad_kernel"])])
def test_triton_forward_and_backward_launch_only_their_kernels(monkeypatch, c, main):
    """Forward: count of kept rows, loss and gradient, means, and no other kernel (no ne/sum/div/mul around them);
    backward: the in-place scale alone. Tensor allocations and views are the only other ops."""
    from dsd2.kernels.launch import Launch
    from torch.utils._python_dispatch import TorchDispatchMode

    launched, inside = [], []
    original = Launch.__call__

    def record(self):
        launched.append(self.name)
        inside.append(True)
        try:
            original(self)
        finally:
            inside.pop()

    monkeypatch.setattr(Launch, "__call__", record)

    class OpsOutsideLaunches(TorchDispatchMode):
        found: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside:
                self.found.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    s, t, y = inputs(3, c, torch.float32, device=triton_device())
    a = s.clone().requires_grad_()
    with OpsOutsideLaunches() as mode:
        loss = kd_loss(a, t, y, backend="triton")
        (2.0 * loss).backward()
    assert launched == ["_kd_count_kernel", *main, "_kd_finish_kernel", "_kd_scale_kernel"]
    # besides allocations and views: the test's 2.0 * loss and autograd's seed and zero gradients for ce and kl
    assert set(mode.found) <= {"empty", "detach", "view", "mul", "ones_like", "zeros"}, mode.found
    assert mode.found.count("mul") == 2  # the test's own 2.0 * loss, and its backward
