"""The public API: functional and module forms, DistillationLoss, dispatch and bad input."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import qrkd
from parity import make_features
from qrkd import backends
from qrkd.backends import reference

FEATURE_LOSSES = {
    "rkd_distance_loss": qrkd.rkd_distance_loss,
    "rkd_angle_loss": qrkd.rkd_angle_loss,
    "fidelity_kernel_loss": qrkd.fidelity_kernel_loss,
}


def test_kd_loss_is_hinton_batchmean():
    s, t = torch.randn(9, 10, dtype=torch.float64), torch.randn(9, 10, dtype=torch.float64)
    p_t = torch.softmax(t / 4.0, dim=1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / 4.0, dim=1))).sum() / 9
    torch.testing.assert_close(qrkd.kd_loss(s, t), 0.5 * 16.0 * kl)
    torch.testing.assert_close(qrkd.kd_loss(s, t, temperature=2.0, alpha=1.0), qrkd.KDLoss(2.0, 1.0)(s, t))


@pytest.mark.parametrize("backend", ["reference", "torch", "auto"])
def test_functional_matches_modules(backend):
    s, t = make_features(17, 4), make_features(17, 31, seed=1)
    pairs = [
        (qrkd.rkd_distance_loss(s, t, backend=backend), qrkd.RKDDistanceLoss(backend=backend)(s, t)),
        (
            qrkd.rkd_distance_loss(s, t, zero_diagonal=True, backend=backend),
            qrkd.RKDDistanceLoss(zero_diagonal=True, backend=backend)(s, t),
        ),
        (qrkd.rkd_angle_loss(s, t, backend=backend), qrkd.RKDAngleLoss(backend=backend)(s, t)),
        (qrkd.fidelity_kernel_loss(s, t, backend=backend), qrkd.FidelityKernelLoss(backend=backend)(s, t)),
    ]
    for functional_value, module_value in pairs:
        assert functional_value.item() == module_value.item()


def test_fidelity_truncates_to_the_narrower_width():
    s, t = make_features(11, 4), make_features(11, 31, seed=1)
    expected = reference.fidelity_kernel_loss(s, t[:, :4])
    torch.testing.assert_close(qrkd.fidelity_kernel_loss(s, t, backend="torch"), expected)
    k = qrkd.fidelity_kernel_matrix(t, backend="torch")
    assert k.shape == (11, 11)
    torch.testing.assert_close(k, reference.fidelity_kernel_matrix(t))
    torch.testing.assert_close(k.diagonal(), torch.ones(11, dtype=torch.float64))


def test_teacher_gets_no_gradient():
    s = make_features(9, 4).requires_grad_(True)
    t = make_features(9, 6, seed=1).requires_grad_(True)
    for fn in FEATURE_LOSSES.values():
        fn(s, t).backward()
    assert t.grad is None and s.grad is not None


def test_half_precision_features_are_computed_in_float32():
    s, t = make_features(9, 4, dtype=torch.bfloat16), make_features(9, 6, seed=1, dtype=torch.float16)
    for fn in FEATURE_LOSSES.values():
        loss = fn(s, t)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, fn(s.float(), t.float()))


SEED_WEIGHTS = {
    "scratch": dict(kd=0.0, dr=0.0, ar=0.0, qk=0.0),
    "kd": dict(kd=0.5, dr=0.0, ar=0.0, qk=0.0, temperature=4.0, kd_alpha=0.5),
    "rkd": dict(kd=0.0, dr=0.1, ar=0.1, qk=0.0, temperature=4.0, kd_alpha=0.5),
    "qrkd_simple": dict(kd=0.5, dr=0.1, ar=0.1, qk=0.1, qk_backend="simple", temperature=4.0, kd_alpha=0.5),
}


@pytest.mark.parametrize("name", SEED_WEIGHTS)
def test_distillation_loss_composes_the_weighted_terms(name):
    w = SEED_WEIGHTS[name]
    torch.manual_seed(0)
    logits_s, logits_t = torch.randn(17, 10, requires_grad=True), torch.randn(17, 10)
    feat_s, feat_t = torch.randn(17, 4, requires_grad=True), torch.randn(17, 31)
    loss = qrkd.DistillationLoss(**w, backend="reference")(logits_s, logits_t, feat_s, feat_t)
    expected = torch.zeros(())
    if w["kd"]:
        expected = expected + w["kd"] * qrkd.kd_loss(logits_s, logits_t, 4.0, 0.5)
    if w["dr"]:
        expected = expected + w["dr"] * reference.rkd_distance_loss(feat_s, feat_t)
    if w["ar"]:
        expected = expected + w["ar"] * reference.rkd_angle_loss(feat_s, feat_t)
    if w["qk"]:
        expected = expected + w["qk"] * reference.fidelity_kernel_loss(feat_s, feat_t[:, :4])
    torch.testing.assert_close(loss, expected)
    if name != "scratch":
        loss.backward()
        assert feat_s.grad is not None or logits_s.grad is not None
    auto = qrkd.DistillationLoss(**w)(logits_s, logits_t, feat_s, feat_t)
    torch.testing.assert_close(auto, expected.detach(), rtol=1e-4, atol=1e-6)


def test_distillation_loss_rejects_bad_weights():
    with pytest.raises(ValueError, match="dr"):
        qrkd.DistillationLoss(dr=-1.0)
    with pytest.raises(TypeError, match="kd"):
        qrkd.DistillationLoss(kd="0.5")
    with pytest.raises(ValueError, match="qk_backend"):
        qrkd.DistillationLoss(qk_backend="quantum")


def test_distillation_loss_reports_the_backend_of_each_term(monkeypatch):
    monkeypatch.delenv("QRKD_BACKEND", raising=False)
    simple = qrkd.DistillationLoss(**SEED_WEIGHTS["qrkd_simple"])
    auto = {op: backends.auto_backend_name(op, "cpu", torch.float32)
            for op in ("rkd_distance_loss", "rkd_angle_loss", "fidelity_kernel_loss")}
    assert simple.term_backends("cpu") == {"kd": "torch (eager)", "rkd_distance": auto["rkd_distance_loss"],
                                           "rkd_angle": auto["rkd_angle_loss"],
                                           "fidelity_kernel(simple)": auto["fidelity_kernel_loss"]}
    fixed = qrkd.DistillationLoss(**SEED_WEIGHTS["rkd"], backend="reference")
    assert fixed.term_backends("cpu") == {"rkd_distance": "reference", "rkd_angle": "reference"}
    monkeypatch.setenv("QRKD_BACKEND", "torch")  # replaces "auto", not a backend the loss names
    assert set(simple.term_backends("cpu").values()) == {"torch (eager)", "torch"}
    assert fixed.term_backends("cpu") == {"rkd_distance": "reference", "rkd_angle": "reference"}
    photonic = qrkd.DistillationLoss(kd=0.0, dr=0.0, ar=0.0, qk=0.1, qk_backend="merlin", qk_n_modes=6,
                                     qk_n_photons=3, qk_detach_student=True)
    assert photonic.term_backends("cpu", torch.float64) == {
        "fidelity_kernel(merlin m=6 n=3, student detached)": "torch"}  # QRKD_BACKEND=torch
    monkeypatch.delenv("QRKD_BACKEND")
    assert photonic.term_backends("cpu", torch.float64) == {
        "fidelity_kernel(merlin m=6 n=3, student detached)": backends.auto_backend_name("photonic_fidelity", "cpu",
                                                                                         torch.complex128)}
    assert qrkd.DistillationLoss(**SEED_WEIGHTS["scratch"]).term_backends("cpu") == {}


def test_distillation_loss_kernel_logits_and_settings():
    simple = qrkd.DistillationLoss(**SEED_WEIGHTS["qrkd_simple"])
    assert simple.kernel_for(4) == "simple" and len(simple.kernels) == 0
    photonic = qrkd.DistillationLoss(kd=0.0, dr=0.1, ar=0.0, qk=0.1, qk_backend="merlin", qk_n_modes=6,
                                     qk_n_photons=3)
    kernel = photonic.kernel_for(4)
    assert isinstance(kernel, qrkd.PhotonicFidelityKernel) and kernel.n_modes == 6 and kernel.n_photons == 3
    assert photonic.kernel_for(4, "cpu") is kernel and list(photonic.kernels) == ["4"]  # built once per width
    assert simple.uses_logits and not photonic.uses_logits and photonic.uses_teacher
    feat_s, feat_t = torch.randn(6, 4), torch.randn(6, 5)
    photonic(None, None, feat_s, feat_t)  # logits are not read when the KD term is off
    assert set(photonic.last_terms) == {"rkd_distance", "qk"}
    assert photonic.settings() == {"kd": 0.0, "dr": 0.1, "ar": 0.0, "qk": 0.1, "qk_backend": "merlin",
                                   "qk_n_modes": 6, "qk_n_photons": 3, "qk_detach_student": False,
                                   "temperature": 4.0, "kd_alpha": 0.5}


# ------------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", FEATURE_LOSSES)
def test_bad_input_names_the_argument(name):
    fn = FEATURE_LOSSES[name]
    good = torch.randn(5, 3)
    with pytest.raises(ValueError, match="batch size"):
        fn(torch.randn(5, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="student must be 2-D"):
        fn(torch.randn(5), good)
    with pytest.raises(ValueError, match="teacher must be 2-D"):
        fn(good, torch.randn(5, 3, 1))
    with pytest.raises(TypeError, match="student must have a floating dtype"):
        fn(torch.ones(5, 3, dtype=torch.int64), good)
    with pytest.raises(TypeError, match="teacher must be a torch.Tensor"):
        fn(good, [[1.0, 2.0, 3.0]] * 5)
    with pytest.raises(ValueError, match="at least one row"):
        fn(torch.randn(0, 3), torch.randn(0, 3))
    with pytest.raises(ValueError, match="backend must be"):
        fn(good, good, backend="fastest")
    with pytest.raises(TypeError, match="backend must be a str"):
        fn(good, good, backend=3)


def test_bad_anchor_range():
    x = torch.randn(5, 3)
    for anchors in [(3, 2), (0, 6), (-1, 2), (0.0, 5)]:
        with pytest.raises(ValueError, match="anchors"):
            qrkd.rkd_angle_loss(x, x, anchors=anchors)


def test_bad_kernel_and_logits():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="kernel"):
        qrkd.fidelity_kernel_loss(x, x, kernel="gaussian")
    with pytest.raises(ValueError, match="one shape"):
        qrkd.kd_loss(torch.randn(5, 10), torch.randn(5, 9))
    with pytest.raises(ValueError, match="temperature"):
        qrkd.kd_loss(torch.randn(5, 10), torch.randn(5, 10), temperature=0.0)


@pytest.mark.parametrize("name", FEATURE_LOSSES)
@pytest.mark.parametrize("backend", ["reference", "torch", "auto"])
def test_single_sample_gives_zero_loss_and_gradient(name, backend):
    s = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    loss = FEATURE_LOSSES[name](s, torch.randn(1, 7, dtype=torch.float64), backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.item() == pytest.approx(0.0, abs=1e-15) and torch.isfinite(grad).all()
    assert grad.abs().max().item() <= 1e-15


# -------------------------------------------------------------------------------------------------------- dispatch


def test_available_backends_and_status():
    names = qrkd.available_backends()
    assert "reference" in names and "torch" in names
    status = qrkd.backend_status()
    assert set(status) == {"reference", "torch", "cpp", "triton"}
    assert all(isinstance(detail, str) and detail for _, detail in status.values())


def test_unavailable_backend_is_a_value_error_listing_the_available(monkeypatch):
    monkeypatch.setitem(backends._status, "cpp", (False, "not built (test)"))
    monkeypatch.setitem(backends._loaded, "cpp", None)
    with pytest.raises(ValueError, match="available: .*reference"):
        qrkd.rkd_angle_loss(torch.randn(4, 3), torch.randn(4, 3), backend="cpp")


def test_env_backend_overrides_auto(monkeypatch):
    monkeypatch.setenv("QRKD_BACKEND", "reference")
    calls = []
    monkeypatch.setattr(reference, "rkd_angle_loss", lambda s, t: calls.append(1) or s.sum() * 0)
    qrkd.rkd_angle_loss(torch.randn(4, 3), torch.randn(4, 3))
    assert calls == [1]
    monkeypatch.setenv("QRKD_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        qrkd.rkd_angle_loss(torch.randn(4, 3), torch.randn(4, 3))


def test_fallback_warns_once_or_raises_when_extensions_are_required(monkeypatch):
    monkeypatch.setitem(backends._status, "cpp", (False, "not built (test)"))
    monkeypatch.setitem(backends._loaded, "cpp", None)
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.delenv("QRKD_BACKEND", raising=False)
    monkeypatch.delenv("QRKD_REQUIRE_EXT", raising=False)
    x = torch.randn(6, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qrkd.rkd_distance_loss(x, x)
        qrkd.rkd_angle_loss(x, x)
    assert len([w for w in caught if "falling back" in str(w.message)]) == 1
    monkeypatch.setenv("QRKD_REQUIRE_EXT", "1")
    with pytest.raises(RuntimeError, match="QRKD_REQUIRE_EXT"):
        qrkd.rkd_angle_loss(x, x)


def test_info_command_runs(capsys):
    from qrkd.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "reference" in out and "auto picks:" in out


def test_reference_matches_the_seed_style_direct_formula():
    # an independent spelling of DESIGN.md 3.2 on a small case, to pin the reference itself
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]], dtype=torch.float64)
    d = reference.pairwise_distances(x)
    expected = torch.tensor([[1e-6, 5.0, 10.0], [5.0, 1e-6, 5.0], [10.0, 5.0, 1e-6]], dtype=torch.float64)
    torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-12)
    y = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    dy = reference.pairwise_distances(y)
    loss = reference.rkd_distance_loss(x, y)
    expected_loss = F.smooth_l1_loss(d / (d.mean() + 1e-12), dy / (dy.mean() + 1e-12))
    torch.testing.assert_close(loss, expected_loss)
