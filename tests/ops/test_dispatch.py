"""Backend choice: CPU -> C++, CUDA -> Triton, and the reference (with one warning) when dsd2._C is missing."""

import importlib
import warnings

import pytest
import torch

from dsd2.ops import _backend, kd_loss, kd_loss_reference
from dsd2.ops.kd_loss import pick_backend


def test_cpu_tensors_take_the_cpp_extension():
    assert _backend.cpp_extension() is not None
    assert pick_backend(torch.zeros(2, 3)) == "cpp"


def test_missing_extension_falls_back_to_reference_with_one_warning(monkeypatch):
    real_import = importlib.import_module

    def no_extension(name, *args, **kwargs):
        if name == "dsd2._C":
            raise ImportError("simulated: not built")
        return real_import(name, *args, **kwargs)

    _backend.cpp_extension.cache_clear()
    monkeypatch.setattr(importlib, "import_module", no_extension)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
            assert pick_backend(s) == "reference"
            got = kd_loss(s, t, y)
            kd_loss(s, t, y)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "fall back to the plain-PyTorch reference" in messages[0]
        torch.testing.assert_close(got, kd_loss_reference(s, t, y)[0])
    finally:
        monkeypatch.undo()
        _backend.cpp_extension.cache_clear()
    assert _backend.cpp_extension() is not None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_take_triton():
    assert pick_backend(torch.zeros(2, 3, device="cuda")) == "triton"
