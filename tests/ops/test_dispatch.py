"""One backend picker for every op (`dsd2.ops.pick`): its choice per device and availability (CPU -> C++, CUDA ->
Triton, else the op's portable path), that each op runs exactly the backend picked or given, and the reference with
one warning when dsd2._C is missing."""

import importlib
import warnings

import pytest
import torch
from conftest import triton_device
from isa_levels import per_level
from oracles import kd_loss_oracle

import dsd2.ops
from dsd2.ops import (
    OP_BACKENDS,
    MaskedSGD,
    backends,
    count_positive_,
    cpu_isa,
    kd_loss,
    masked_conv2d,
    masked_linear,
    pick,
    relu_count,
)

PORTABLE = {"kd_loss": "reference", "relu_count": "reference", "masked_sgd": "foreach", "masked_linear": "reference",
            "masked_conv2d": "reference"}
FLOAT_ONLY = {"relu_count", "masked_linear", "masked_conv2d"}  # ops whose C++ kernels refuse integer tensors
# device, dsd2._C usable, Triton usable -> the fused backend picked (None: the op's portable path)
CASES = [
    ("cpu", True, True, "cpp"),
    ("cpu", True, False, "cpp"),
    ("cpu", False, True, None),
    ("cuda", True, True, "triton"),
    ("cuda", False, True, "triton"),
    ("cuda", True, False, None),
    ("meta", True, True, None),
]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def run_kd_loss(device, backend=None):
    s = torch.randn(4, 10, device=device, requires_grad=True)
    t, y = torch.randn(4, 10, device=device), torch.randint(0, 10, (4,), device=device)
    kd_loss(s, t, y, backend=backend).backward()


def run_relu_count(device, backend=None):
    x, counts = torch.randn(4, 6, device=device), torch.zeros(6, dtype=torch.long, device=device)
    relu_count(x, counts, backend=backend)
    count_positive_(x, counts, backend=backend)


def run_masked_sgd(device, backend=None):
    p = torch.randn(5, device=device, requires_grad=True)
    p.grad = torch.randn(5, device=device)
    MaskedSGD([p], {p: torch.rand(5, device=device) < 0.5}, lr=0.1, backend=backend or "auto").step()


def run_masked_linear(device, backend=None):
    w = torch.randn(3, 6, device=device, requires_grad=True)
    masked_linear(torch.randn(4, 6, device=device), w, torch.rand(3, 6, device=device) < 0.5,
                  backend=backend).sum().backward()


def run_masked_conv2d(device, backend=None):
    w = torch.randn(2, 2, 3, 3, device=device, requires_grad=True)
    masked_conv2d(torch.randn(1, 2, 5, 5, device=device), w, torch.rand(2, 2, 3, 3, device=device) < 0.5,
                  backend=backend).sum().backward()


RUN = {"kd_loss": run_kd_loss, "relu_count": run_relu_count, "masked_sgd": run_masked_sgd,
       "masked_linear": run_masked_linear, "masked_conv2d": run_masked_conv2d}
# the entry points of each op's non-C++ backends: (module, function name, backend)
ENTRY_POINTS = [
    ("dsd2.kernels.kd_loss", "kd_loss_forward", "triton"),
    ("dsd2.kernels.relu_count", "count_positive_", "triton"),
    ("dsd2.kernels.relu_count", "relu_count", "triton"),
    ("dsd2.kernels.masked_sgd", "masked_sgd_step_", "triton"),
    ("dsd2.kernels.masked_linear", "masked_linear_forward", "triton"),
    ("dsd2.kernels.masked_conv2d", "masked_conv2d_forward", "triton"),
    ("dsd2.ops.kd_loss", "kd_loss_reference", "reference"),
    ("dsd2.ops.relu_count", "count_positive_reference", "reference"),
    ("dsd2.ops.masked_sgd", "masked_sgd_reference", "reference"),
    ("dsd2.ops.masked_sgd", "masked_sgd_foreach", "foreach"),
    ("dsd2.ops.masked_linear", "masked_linear_reference", "reference"),
    ("dsd2.ops.masked_conv2d", "masked_conv2d_reference", "reference"),
]


class RecordingExtension:
    """dsd2._C, noting every call of one of its functions as the "cpp" backend."""

    def __init__(self, ext, calls: list[str]):
        self.ext, self.calls = ext, calls

    def __getattr__(self, name):
        real = getattr(self.ext, name)

        def call(*args):
            self.calls.append("cpp")
            return real(*args)

        return call


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    """The backends the ops run from here on, one entry per call into a backend."""
    out: list[str] = []
    for module_name, name, backend in ENTRY_POINTS:
        module = importlib.import_module(module_name)
        real = getattr(module, name)

        def spy(*args, _real=real, _backend=backend, **kwargs):
            out.append(_backend)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    ext = dsd2.ops.cpp_extension()
    for op in OP_BACKENDS:
        monkeypatch.setattr(importlib.import_module(f"dsd2.ops.{op}"), "cpp_extension",
                            lambda: RecordingExtension(ext, out))
    return out


def test_every_op_has_a_portable_backend_after_its_fused_ones():
    assert set(OP_BACKENDS) == set(RUN)
    for op, names in OP_BACKENDS.items():
        assert names[:2] == ("triton", "cpp") and names[2] == PORTABLE[op], op


@pytest.mark.parametrize("device, cpp, triton, fused", CASES)
@pytest.mark.parametrize("op", list(OP_BACKENDS))
def test_picker_chooses_by_device_and_availability(op, device, cpp, triton, fused):
    want = fused or PORTABLE[op]
    extension = dsd2.ops.cpp_extension if cpp else (lambda: None)
    assert pick(op, device, extension=extension, triton=triton) == want
    assert pick(op, torch.device(device), extension=extension, triton=triton) == want


@pytest.mark.parametrize("op", list(OP_BACKENDS))
def test_picker_takes_the_devices_of_tensors_and_the_dtypes_of_the_kernels(op):
    assert pick(op, torch.zeros(2, 3)) == "cpp"
    assert pick(op, torch.empty(2, 3, device="meta")) == PORTABLE[op]
    integers = pick(op, torch.zeros(2, 3, dtype=torch.int32))  # the C++ counting and masking kernels refuse ints
    assert integers == ("reference" if op in FLOAT_ONLY else "cpp")


@pytest.mark.parametrize("op", list(OP_BACKENDS))
def test_picker_loads_the_extension_only_for_a_cpu_tensor(op):
    """A CUDA-only user without dsd2._C gets no warning about it: the loader is not called off the CPU."""

    def loader():
        raise AssertionError("dsd2._C was asked for")

    assert pick(op, "cuda", extension=loader, triton=True) == "triton"
    assert pick(op, "meta", extension=loader) == PORTABLE[op]


@pytest.mark.parametrize("op", list(OP_BACKENDS))
def test_a_given_backend_is_taken_and_an_unknown_one_refused(op):
    for backend in OP_BACKENDS[op]:
        assert pick(op, "cpu", backend) == backend
    with pytest.raises(ValueError, match=f"backend 'magic' is not known for {op}; allowed: triton, cpp"):
        pick(op, "cpu", "magic")
    with pytest.raises(ValueError, match="op 'conv' is not known"):
        pick("conv", "cpu")


@pytest.mark.parametrize("extension", ["built", "missing"])
@pytest.mark.parametrize("op", list(OP_BACKENDS))
def test_each_op_runs_the_backend_it_picks_on_the_cpu(op, extension, calls, monkeypatch):
    if extension == "missing":
        for name in OP_BACKENDS:
            monkeypatch.setattr(importlib.import_module(f"dsd2.ops.{name}"), "cpp_extension", lambda: None)
    RUN[op]("cpu")
    assert calls and set(calls) == {"cpp" if extension == "built" else PORTABLE[op]}


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("op", list(OP_BACKENDS))
def test_each_op_runs_the_backend_it_picks_on_cuda(op, calls):
    RUN[op]("cuda")
    assert pick(op, "cuda") == "triton" and set(calls) == {"triton"}


@pytest.mark.parametrize("op, backend", [(op, b) for op, names in OP_BACKENDS.items() for b in names])
def test_each_op_runs_the_backend_it_is_given(op, backend, calls):
    RUN[op](triton_device() if backend == "triton" else "cpu", backend)
    assert calls and set(calls) == {backend}


def test_info_reports_each_ops_backend_for_a_cpu_and_a_cuda_tensor():
    report = backends()["ops"]
    for op in OP_BACKENDS:
        assert f"{op} cpu={pick(op, 'cpu')} cuda={pick(op, 'cuda')}" in report


def test_missing_extension_falls_back_to_reference_with_one_warning(monkeypatch):
    real_import = importlib.import_module

    def no_extension(name, *args, **kwargs):
        if name == "dsd2._C":
            raise ImportError("simulated: not built")
        return real_import(name, *args, **kwargs)

    dsd2.ops.cpp_extension.cache_clear()
    monkeypatch.setattr(importlib, "import_module", no_extension)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
            assert [pick(op, s) for op in OP_BACKENDS] == [PORTABLE[op] for op in OP_BACKENDS]
            got = kd_loss(s, t, y)
            kd_loss(s, t, y)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "fall back to the plain-PyTorch reference" in messages[0]
        torch.testing.assert_close(got.double(), kd_loss_oracle(s, t, y)[0], rtol=1e-5, atol=1e-5)
    finally:
        monkeypatch.undo()
        dsd2.ops.cpp_extension.cache_clear()
    assert dsd2.ops.cpp_extension() is not None


def test_a_per_level_test_runs_the_kernels_at_its_level(cpu_isa_level):
    """tests/ops/conftest.py sets the level a test names for its duration (else every run would use the best)."""
    assert cpu_isa() == cpu_isa_level


@pytest.mark.parametrize("backend, cpu_isa_level", per_level("cpp", "triton", "reference"))
def test_only_the_cpp_rows_of_a_backend_test_run_per_level(backend, cpu_isa_level):
    assert (cpu_isa_level is None) == (backend != "cpp")
    if cpu_isa_level is not None:
        assert cpu_isa() == cpu_isa_level
