"""What is specific to the compiled CPU backend ("cpp", qrkd._C): one-dimensional and large (striped) inputs, anchor
ranges and column bands, thread counts, the loss-only path, the custom ops (opcheck, torch.compile) and dispatch. The
contract every backend meets is checked in tests/test_backend_contract.py.

Skipped as a whole when the extension is not built, unless QRKD_REQUIRE_EXT=1 (CI), which turns a missing build into
a failure.
"""

import os

import pytest
import torch

from parity import (RELATIONS, check_fidelity_moments_route, check_parity, loss_fn, make_features, torch_threads,
                    value_and_grad)
from qrkd import backends
from qrkd.backends import pure_torch, reference
from qrkd.relations import FEATURE_OPS

cpp = pytest.importorskip("qrkd.backends.cpp")
_OK, _DETAIL = cpp.status()
if not _OK:
    if os.environ.get("QRKD_REQUIRE_EXT", "") not in ("", "0"):
        raise RuntimeError(f"QRKD_REQUIRE_EXT=1 but the extension is not available: {_DETAIL}")
    pytest.skip(f"qrkd._C not built: {_DETAIL}", allow_module_level=True)

@pytest.mark.parametrize("n", [17, 128])
def test_angle_one_dimensional_student(n):
    # In one dimension every angle is +-1 and the true gradient is 0: the reference gets exact zeros, while the law of
    # cosines cancels large terms (~1 / closest gap) to rounding. float64: an absolute floor; float32: no worse than
    # the torch backend, the other law-of-cosines implementation.
    s, t = make_features(n, 1, seed=50), make_features(n, 1, seed=51)
    truth, _ = value_and_grad(reference.rkd_angle_loss, s, t)
    v, g = value_and_grad(cpp.rkd_angle_loss, s, t)
    assert abs(v.item() - truth.item()) <= 1e-10 * truth.item()
    # the floor is rounding: over 15 seeds each at N = 64, 128 and 200 the largest |g| was 5.8e-11, 5.8e-11, 9.2e-11
    assert g.abs().max().item() <= 2e-10
    v32, g32 = value_and_grad(cpp.rkd_angle_loss, s.float(), t.float())
    _, g32_torch = value_and_grad(pure_torch.rkd_angle_loss, s.float(), t.float())
    assert abs(v32.item() - truth.item()) <= 2e-5 * truth.item()
    assert g32.abs().max().item() <= 2 * g32_torch.abs().max().item() + 1e-6
    check_parity("distance", cpp, s, t)
    check_parity("fidelity", cpp, s, t)


@pytest.mark.parametrize("relation", ["distance", "distance_zero_diag", "fidelity"])
@pytest.mark.parametrize("kind", ["random", "duplicates", "shifted"])
def test_parity_large_batch_striped_gram(relation, kind):
    # from N = 1024 on the Gram matrices are computed in row stripes (upper triangle only)
    check_parity(relation, cpp, make_features(1100, 31, kind, seed=52), make_features(1100, 6, seed=53))


@pytest.mark.parametrize(
    "relation,n,d",
    [(r, n, d) for r in ("distance", "fidelity") for n, d in ((128, 16), (150, 12), (300, 8))]
    + [("angle", 128, 16), ("angle", 150, 12)],
)
def test_parity_either_side_of_the_small_product_path(relation, n, d):
    # N^2 D up to common.h's kSmallProduct (2^18): the Gram and the gradient's product run in one thread, not at::mm;
    # (128, 16) is at the threshold, (150, 12) just above it for the product (the Gram's limit is twice that), (300, 8)
    # above both
    check_parity(relation, cpp, make_features(n, d, "duplicates", seed=54), make_features(n, d + 3, seed=55))


@pytest.mark.parametrize("relation", RELATIONS)
def test_parity_both_sides_special(relation):
    s = make_features(40, 6, "duplicates", seed=7)
    s[5] = 0.0
    t = make_features(40, 9, "shifted", seed=8)
    t[3] = t[11]
    check_parity(relation, cpp, s, t)


@pytest.mark.parametrize("relation", RELATIONS)
def test_backward_of_a_scaled_loss(relation):
    s, t = make_features(23, 5, "duplicates", seed=11), make_features(23, 8, seed=12)
    grads = []
    for impl in (reference, cpp):
        x = s.clone().requires_grad_(True)
        (3.0 * loss_fn(impl, relation)(x, t)).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-8 * grads[0].abs().max().item() + 1e-15)


def test_gradcheck_angle_anchor_range_and_fidelity_matrix():
    t = make_features(7, 4, seed=15)
    s = make_features(7, 3, seed=16).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: cpp.rkd_angle_loss(x, t, 2, 5), (s,))
    assert torch.autograd.gradcheck(cpp.fidelity_kernel_matrix, (s,))
    # a non-symmetric upstream gradient for the kernel matrix
    w = make_features(7, 7, seed=17)
    assert torch.autograd.gradcheck(lambda x: (cpp.fidelity_kernel_matrix(x) * w).sum(), (s,))


@pytest.mark.parametrize("shape", [(1, 3), (6, 1), (17, 31), (128, 4)])
def test_fidelity_matrix_matches_reference(shape):
    x = make_features(*shape, "zero_rows", seed=18)
    w = make_features(shape[0], shape[0], seed=19)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        xs = [x.to(dtype).requires_grad_(True) for _ in range(2)]
        ks = [reference.fidelity_kernel_matrix(xs[0]), cpp.fidelity_kernel_matrix(xs[1])]
        torch.testing.assert_close(ks[1], ks[0], rtol=tol, atol=tol)
        grads = [torch.autograd.grad((k * w.to(dtype)).sum(), xi)[0] for k, xi in zip(ks, xs)]
        torch.testing.assert_close(grads[1], grads[0], rtol=tol, atol=tol * max(1.0, grads[0].abs().max().item()))


def _angle_range_check(s64, t64, start, stop):
    def run(impl, s, t):
        return value_and_grad(lambda x, y: impl.rkd_angle_loss(x, y, start, stop), s, t)

    truth_v, truth_g = run(reference, s64, t64)
    v, g = run(cpp, s64, t64)
    scale = truth_g.abs().max().item()
    assert abs(v.item() - truth_v.item()) <= 1e-10 * abs(truth_v.item()) + 1e-14
    assert (g - truth_g).abs().max().item() <= 1e-8 * scale + 1e-14
    ref_v32, ref_g32 = run(reference, s64.float(), t64.float())
    v32, g32 = run(cpp, s64.float(), t64.float())
    ref_err_v = abs(ref_v32.double().item() - truth_v.item())
    ref_err_g = (ref_g32.double() - truth_g).abs().max().item()
    assert abs(v32.double().item() - truth_v.item()) <= 2 * ref_err_v + 2e-5 * abs(truth_v.item()) + 1e-12
    assert (g32.double() - truth_g).abs().max().item() <= 2 * ref_err_g + 1e-5 * scale + 1e-6


@pytest.mark.parametrize("anchors", [(0, 1), (3, 11), (16, 17), (5, 5), (0, 17)])
def test_angle_anchor_ranges_match_reference(anchors):
    _angle_range_check(make_features(17, 5, "duplicates", seed=20), make_features(17, 8, seed=21), *anchors)


@pytest.mark.parametrize("band", ["3", "64"])
def test_angle_column_bands(monkeypatch, band):
    # the private gradient buffers cover a band of columns at a time; small forced bands exercise several of them
    monkeypatch.setenv("QRKD_CPP_ANGLE_BAND", band)
    check_parity("angle", cpp, make_features(70, 6, "duplicates", seed=24), make_features(70, 3, seed=25))
    _angle_range_check(make_features(70, 4, seed=26), make_features(70, 5, "zero_rows", seed=27), 9, 50)


@pytest.mark.parametrize("threads", [1, 2])
def test_angle_full_tiles(threads):
    # N = 603: groups of eight anchor blocks and a partial one, a full column chunk and a partial one, ten blocks of
    # rows b, and N not a multiple of a vector (padded rows, masked last vectors); against the torch backend, whose
    # angle pass is chunked (the reference would hold N^3 float64)
    with torch_threads(threads):
        check_parity("angle", cpp, make_features(603, 5, "duplicates", seed=60), make_features(603, 7, seed=61),
                     against=pure_torch)


@pytest.mark.parametrize("relation", RELATIONS)
def test_thread_counts_agree(relation):
    s, t = make_features(150, 7, "duplicates", seed=28), make_features(150, 5, seed=29)
    results = []
    for threads in (1, max(2, torch.get_num_threads())):
        with torch_threads(threads):
            results.append(value_and_grad(loss_fn(cpp, relation), s, t))
    (v1, g1), (v2, g2) = results
    torch.testing.assert_close(v2, v1, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(g2, g1, rtol=1e-10, atol=1e-12 * g1.abs().max().item() + 1e-15)


@pytest.mark.parametrize("relation", RELATIONS)
def test_no_grad_path_gives_the_same_value(relation):
    s, t = make_features(33, 6, seed=30), make_features(33, 4, seed=31)
    with_grad, _ = value_and_grad(loss_fn(cpp, relation), s, t)
    with torch.no_grad():
        plain = loss_fn(cpp, relation)(s.clone().requires_grad_(True), t)
    # the loss-only kernels are separate loops: equal up to the order of the float64 sums
    torch.testing.assert_close(plain, with_grad, rtol=1e-13, atol=0)
    torch.testing.assert_close(loss_fn(cpp, relation)(s, t), with_grad, rtol=1e-13, atol=0)  # no requires_grad


def test_distance_zero_diagonal_single_row_is_zero():
    x = make_features(1, 4, seed=34).requires_grad_(True)
    loss = cpp.rkd_distance_loss(x, make_features(1, 3, seed=35), True)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0 and grad.abs().max().item() == 0.0


def test_non_contiguous_student():
    base = make_features(20, 12, seed=40)
    s, t = base[:, ::3], make_features(20, 5, seed=41)
    assert not s.is_contiguous()
    for relation in RELATIONS:
        check_parity(relation, cpp, s, t)


def test_ops_pass_opcheck():
    s, t = make_features(9, 4, seed=42), make_features(9, 6, seed=43)
    s_grad = s.clone().requires_grad_(True)
    ops = torch.ops.qrkd
    torch.library.opcheck(ops.rkd_distance, (s_grad, t, False, True))
    torch.library.opcheck(ops.rkd_distance, (s, t, True, False))
    torch.library.opcheck(ops.rkd_angle, (s_grad, t, 2, 7, True))
    torch.library.opcheck(ops.rkd_angle, (s, t, 0, 9, False))
    torch.library.opcheck(ops.fidelity_loss, (s_grad, t[:, :4].contiguous(), True))
    torch.library.opcheck(ops.fidelity_matrix, (s_grad,))
    torch.library.opcheck(ops.fidelity_matrix_backward, (make_features(9, 9, seed=44), s))


def test_ops_reject_bad_input():
    s = make_features(5, 3, seed=45)
    with pytest.raises(RuntimeError, match="anchors"):
        torch.ops.qrkd.rkd_angle(s, s, 3, 2, False)
    with pytest.raises(RuntimeError, match="batch sizes"):
        torch.ops.qrkd.rkd_distance(s, s[:4], False, False)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.qrkd.fidelity_matrix(s.to(torch.int64))
    with pytest.raises(RuntimeError, match="2-D"):
        torch.ops.qrkd.rkd_angle(s[0], s[0], 0, 1, False)


def test_torch_compile_matches_eager():
    torch._dynamo.reset()

    def losses(x, t):
        return (
            cpp.rkd_distance_loss(x, t, False)
            + 0.5 * cpp.rkd_distance_loss(x, t, True)
            + 2.0 * cpp.rkd_angle_loss(x, t)
            + cpp.fidelity_kernel_loss(x[:, :4], t[:, :4])
            + cpp.fidelity_kernel_matrix(x).mean()
        )

    # inductor on float32 (the training dtype); float64 through AOTAutograd alone, which checks the same fake and
    # autograd registrations without a second C++ build of the graph
    for dtype, backend in ((torch.float32, "inductor"), (torch.float64, "aot_eager")):
        compiled = torch.compile(losses, backend=backend, dynamic=False)
        s, t = make_features(17, 6, "duplicates", seed=46, dtype=dtype), make_features(17, 4, seed=47, dtype=dtype)
        v_eager, g_eager = value_and_grad(losses, s, t, grad_output=1.5)
        v_comp, g_comp = value_and_grad(compiled, s, t, grad_output=1.5)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(v_comp, v_eager, rtol=tol, atol=tol)
        torch.testing.assert_close(g_comp, g_eager, rtol=tol, atol=tol * g_eager.abs().max().item())


def test_dispatch_prefers_cpp_on_cpu():
    import qrkd

    assert "cpp" in qrkd.available_backends()
    for op in FEATURE_OPS:
        for dtype in (torch.float32, torch.float64):
            assert backends.auto_backend_name(op, "cpu", dtype) == "cpp"
    s, t = make_features(11, 5, seed=48), make_features(11, 3, seed=49)
    assert qrkd.rkd_angle_loss(s, t, backend="auto").item() == cpp.rkd_angle_loss(s, t).item()
    assert qrkd.rkd_angle_loss(s, t, backend="cpp", anchors=(2, 6)).item() == cpp.rkd_angle_loss(s, t, 2, 6).item()
    assert qrkd.rkd_distance_loss(s, t, zero_diagonal=True).item() == cpp.rkd_distance_loss(s, t, True).item()
    assert qrkd.fidelity_kernel_loss(s, t).item() == cpp.fidelity_kernel_loss(s[:, :3].contiguous(), t).item()
    torch.testing.assert_close(qrkd.fidelity_kernel_matrix(s), cpp.fidelity_kernel_matrix(s), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fidelity_loss_takes_moments_for_narrow_features(monkeypatch, dtype):
    check_fidelity_moments_route(monkeypatch, "cpp", dtype)


def test_fidelity_loss_below_the_moments_takes_the_kernel(monkeypatch):
    # one row fewer than cpp._MOMENTS_MIN_N: the C++ kernel, not the moments
    from qrkd.backends import fidelity_moments

    monkeypatch.setattr(fidelity_moments, "loss_and_grad", None)  # any call would fail
    s, t = make_features(cpp._MOMENTS_MIN_N - 1, 4, seed=76), make_features(cpp._MOMENTS_MIN_N - 1, 4, seed=77)
    check_parity("fidelity", cpp, s, t)
