"""Issue 9, items 1 and 5: module casts keep the photonic interferometer exact on every path PyTorch moves a module
by; a PhotonicFidelityKernel and a DistillationLoss holding one survive pickle, torch.save and load_state_dict (strict
or not) with the exact loss; a bad kernel state_dict is refused and leaves the module as it was."""

import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import qrkd
from qrkd import PhotonicFidelityKernel
from qrkd.photonic import haar_unitary


def _kernel(**kw):
    return PhotonicFidelityKernel(4, 6, n_photons=3, seed=11, **kw)


def _x(n=7, d=4, dtype=torch.float64, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------- casts (item 1)

CASTS = {
    "to(float64)": (lambda k: k.to(torch.float64), torch.complex128, torch.float64),
    "to(cpu, float64)": (lambda k: k.to("cpu", torch.float64), torch.complex128, torch.float64),
    "to(dtype=float64)": (lambda k: k.to(dtype=torch.float64), torch.complex128, torch.float64),
    "type(float64)": (lambda k: k.type(torch.float64), torch.complex128, torch.float64),
    "double()": (lambda k: k.double(), torch.complex128, torch.float64),
    "to(float32)": (lambda k: k.to(torch.float32), torch.complex64, torch.float32),
    "float()": (lambda k: k.float(), torch.complex64, torch.float32),
    "to(bfloat16)": (lambda k: k.to(torch.bfloat16), torch.complex64, torch.float32),
    "to(float16)": (lambda k: k.to(torch.float16), torch.complex64, torch.float32),
    "half()": (lambda k: k.half(), torch.complex64, torch.float32),
    "bfloat16()": (lambda k: k.bfloat16(), torch.complex64, torch.float32),
    "to(complex64)": (lambda k: k.to(torch.complex64), torch.complex64, torch.float32),
    "to(cpu)": (lambda k: k.to("cpu"), torch.complex128, torch.float32),
    "cpu()": (lambda k: k.cpu(), torch.complex128, torch.float32),
    "to_empty(cpu)": (lambda k: k.to_empty(device="cpu"), torch.complex128, torch.float32),
}


@pytest.mark.parametrize("path", list(CASTS))
def test_every_cast_keeps_the_interferometer_exact(path):
    cast, unitary_dtype, dtype = CASTS[path]
    k = _kernel()
    before, state = k.unitary.clone(), k.input_state.clone()
    x = _x()
    expected = k(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = cast(k)
    assert not [w for w in caught if "imaginary" in str(w.message)]  # nothing is discarded
    assert out is k and list(k.state_dict()) == ["unitary", "input_state"]
    assert k.unitary.dtype == unitary_dtype and k.dtype == dtype
    assert torch.equal(k.input_state, state) and k.input_state.dtype == torch.long
    tol = 1e-15 if unitary_dtype == torch.complex128 else 1e-7
    assert (k.unitary.to(torch.complex128) - before).abs().max().item() <= tol
    got = k(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(torch.diagonal(got), torch.ones(7, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15 if tol == 1e-15 else 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("path", ["to(cuda, float64)", "cuda().to(float64)", "cuda().half()", "to(cuda).cpu()"])
def test_device_moves_with_casts_keep_the_interferometer_exact(path):
    cast = {
        "to(cuda, float64)": lambda k: k.to("cuda", torch.float64),
        "cuda().to(float64)": lambda k: k.cuda().to(torch.float64),
        "cuda().half()": lambda k: k.cuda().half(),
        "to(cuda).cpu()": lambda k: k.to("cuda").cpu(),
    }[path]
    k = _kernel()
    before, x = k.unitary.clone(), _x()
    expected = k(x, backend="torch")
    cast(k)
    wide = "float64" in path or path == "to(cuda).cpu()"
    assert k.unitary.dtype == (torch.complex128 if wide else torch.complex64)
    assert k.input_state.dtype == torch.long and k.input_state.device == k.unitary.device
    assert (k.unitary.cpu().to(torch.complex128) - before).abs().max().item() <= (1e-15 if wide else 1e-7)
    got = k(x.to(k.unitary.device), backend="torch").cpu()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-14 if wide else 1e-5)


def test_float64_cast_computes_float32_features_in_float64():
    k = _kernel().to(torch.float64)
    x = _x(dtype=torch.float32)
    got = k(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _kernel()(x.double()), rtol=0, atol=1e-14)


def test_half_cast_computes_half_features_in_float32():
    k = _kernel().half()
    x = _x(dtype=torch.float16)
    got = k(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(torch.diagonal(got), torch.ones(7), rtol=0, atol=1e-5)
    torch.testing.assert_close(got, _kernel()(x.float()), rtol=0, atol=1e-5)


def test_casts_round_trip_and_to_empty_keeps_the_state():
    k = _kernel()
    before = k.unitary.clone()
    k.to(torch.bfloat16).to(torch.float64)
    assert k.unitary.dtype == torch.complex128 and (k.unitary - before).abs().max().item() < 1e-7
    k2 = _kernel(dtype=torch.float64)
    k2.to_empty(device="cpu")
    assert torch.equal(k2.unitary, before) and k2.input_state.tolist() == [1, 0, 1, 0, 1, 0]


def test_a_non_floating_cast_is_refused_and_changes_nothing():
    k = _kernel()
    before = k.unitary.clone()
    with pytest.raises(TypeError, match="cannot be cast to torch.int32"):
        k.type(torch.int32)
    assert torch.equal(k.unitary, before) and k.input_state.dtype == torch.long


@pytest.mark.parametrize("cast", ["to(float64)", "to(cpu, float64)", "to(bfloat16)", "half()", "to(float32)"])
def test_casting_a_model_that_holds_a_photonic_distillation_loss(cast):
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 4)
            self.criterion = qrkd.DistillationLoss(kd=0.0, dr=0.0, ar=0.0, qk=1.0, qk_backend="merlin")

    model = Holder()
    logits = torch.randn(6, 10, dtype=torch.float64)
    s, t = _x(6, 4, seed=1), _x(6, 4, seed=2)
    expected = model.criterion(logits, logits, s, t)  # builds the kernel for width 4
    kernel = model.criterion.kernels["4"]
    assert kernel.unitary.dtype == torch.complex128
    CASTS[cast][0](model)
    assert kernel.unitary.is_complex()
    got = model.criterion(logits, logits, s, t)
    assert got.item() > 1e-3  # the qk term has not collapsed
    tol = 1e-14 if kernel.unitary.dtype == torch.complex128 else 1e-6
    torch.testing.assert_close(got, expected, rtol=tol, atol=0)


# -------------------------------------------------------------------------------------- persistence (item 5)


def _trained_loss():
    """A used DistillationLoss whose interferometer differs from the one a fresh loss builds (as if it had been
    replaced or trained), so only a real round trip restores its values."""
    loss = qrkd.DistillationLoss(kd=0.5, dr=0.1, ar=0.1, qk=1.0, qk_backend="merlin", qk_n_modes=6, qk_n_photons=3)
    logits_s, logits_t = torch.randn(9, 10), torch.randn(9, 10)
    feat_s, feat_t = torch.randn(9, 4), torch.randn(9, 31)
    loss(logits_s, logits_t, feat_s, feat_t)
    with torch.no_grad():
        loss.kernels["4"].unitary.copy_(haar_unitary(6, torch.Generator().manual_seed(99)))
    return loss, (logits_s, logits_t, feat_s, feat_t)


def _values(loss, inputs):
    total = loss(*inputs)
    return total, dict(loss.last_terms)


def _assert_same(a, b):
    assert torch.equal(a[0], b[0]), (a[0], b[0])
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_kernel_pickles_and_torch_saves():
    k = _kernel()
    with torch.no_grad():
        k.unitary.copy_(haar_unitary(6, torch.Generator().manual_seed(5)))
    x = _x()
    for copy in (pickle.loads(pickle.dumps(k)), _torch_round_trip(k)):
        assert torch.equal(copy(x), k(x)) and copy.rows == k.rows
        copy.load_state_dict(_kernel().state_dict())  # still loads (and re-syncs) after unpickling
        assert torch.equal(copy(x), _kernel()(x))


def _torch_round_trip(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_distillation_loss_round_trips_restore_the_exact_loss():
    loss, inputs = _trained_loss()
    expected = _values(loss, inputs)
    fresh_values = _values(qrkd.DistillationLoss(**_loss_args()), inputs)
    assert not torch.equal(fresh_values[1]["qk"], expected[1]["qk"])  # the round trips below have work to do

    _assert_same(_values(pickle.loads(pickle.dumps(loss)), inputs), expected)
    _assert_same(_values(_torch_round_trip(loss), inputs), expected)

    state = loss.state_dict()
    assert "kernels.4.unitary" in state
    strict = qrkd.DistillationLoss(**_loss_args())
    strict.load_state_dict(state)
    _assert_same(_values(strict, inputs), expected)

    lenient = qrkd.DistillationLoss(**_loss_args())
    result = lenient.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(lenient.kernels["4"].unitary, loss.kernels["4"].unitary)
    _assert_same(_values(lenient, inputs), expected)


def _loss_args():
    return dict(kd=0.5, dr=0.1, ar=0.1, qk=1.0, qk_backend="merlin", qk_n_modes=6, qk_n_photons=3)


def test_distillation_loss_refuses_a_kernel_it_cannot_hold():
    loss, _ = _trained_loss()
    state = loss.state_dict()
    other = qrkd.DistillationLoss(**dict(_loss_args(), qk_n_modes=8))  # its kernel for width 4 has 8 modes
    with pytest.raises(RuntimeError, match="kernels.4"):
        other.load_state_dict(state, strict=False)
    assert "4" not in other.kernels


def _bad_states():
    u = haar_unitary(6, torch.Generator().manual_seed(3))
    good_state = torch.tensor([1, 1, 0, 0, 0, 0])
    return {
        "no photon": ({"input_state": torch.zeros(6, dtype=torch.long)}, "input_state"),
        "13 photons": ({"input_state": torch.tensor([3, 3, 3, 3, 1, 0])}, "input_state"),
        "negative count": ({"input_state": torch.tensor([2, -1, 1, 0, 0, 1])}, "input_state"),
        "float state": ({"input_state": torch.tensor([1.0, 0, 1, 0, 1, 0])}, "input_state"),
        "non-unitary": ({"unitary": u * 1.1}, "not unitary"),
        "real matrix": ({"unitary": u.real.contiguous()}, "complex"),
        "NaN matrix": ({"unitary": u * float("nan")}, "not unitary"),
        "wrong shape": ({"unitary": haar_unitary(5)}, "shape"),
        # all or nothing: a valid matrix is not copied when the state beside it is refused, and vice versa
        "good matrix, bad state": ({"unitary": u, "input_state": torch.zeros(6, dtype=torch.long)}, "input_state"),
        "bad matrix, good state": ({"unitary": u * 2, "input_state": good_state}, "not unitary"),
    }


@pytest.mark.parametrize("case", list(_bad_states()))
@pytest.mark.parametrize("strict", [True, False])
def test_bad_kernel_state_dict_is_refused_and_changes_nothing(case, strict):
    k = _kernel()
    patch, match = _bad_states()[case]
    state = dict(k.state_dict(), **patch)
    before = (k.unitary.clone(), k.input_state.clone(), k.n_photons, k.rows, k.normalisation)
    x = _x()
    expected = k(x)
    with pytest.raises(RuntimeError, match=match):
        k.load_state_dict(state, strict=strict)
    assert torch.equal(k.unitary, before[0]) and torch.equal(k.input_state, before[1])
    assert (k.n_photons, k.rows, k.normalisation) == before[2:]
    assert torch.equal(k(x), expected)


def test_valid_kernel_state_dict_with_another_state_is_taken_whole():
    k = _kernel()
    other = PhotonicFidelityKernel(4, 6, input_state=[2, 0, 1, 0, 0, 1], seed=4)
    k.load_state_dict(other.state_dict())
    assert k.n_photons == 4 and k.rows == [0, 0, 2, 5] and k.normalisation == 2.0
    x = _x()
    assert torch.equal(k(x), other(x))


def test_share_memory_reaches_the_constants():
    k = _kernel()
    k.share_memory()
    assert k.unitary.is_shared() and k.input_state.is_shared()
