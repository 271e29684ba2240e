"""What is specific to the triton backend: many programs per launch (small tiles), anchor ranges, the fidelity kernel
matrix, status without triton or without the interpreter, the kernels' sm_90 compilation, the public API, and the full
grid on a GPU. The contract every backend meets is checked in tests/test_backend_contract.py.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 and the kernels run on CPU tensors through Triton's
interpreter (milliseconds per program instance): these tests keep N <= 33. The full grid is marked `gpu` and runs on
CUDA tensors with `pytest -m gpu`.
"""

import os
import subprocess
import sys

import pytest
import torch

import qrkd
from parity import RELATIONS, check_angle_shares_add_up, check_parity, loss_fn, make_features
from qrkd.backends import reference, triton_launch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on_device(*xs):
    return [x.to(DEVICE) for x in xs]


def parity(relation, s, t, grad_output=1.0):
    return check_parity(relation, triton_launch, *on_device(s, t), grad_output=grad_output)


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiles much smaller than N, so that the multi-program paths (tile edges, off-diagonal angle tile pairs counted
    twice, several anchor chunks, atomics from many programs) run under the interpreter too."""
    blocks = {
        "sq": (16, 16, 4, 4),
        "tail": (16, 16, 4),
        "angle": (4, 8, 4),
        "pair": (16, 16, 16, 4),
        "fid": (16, 16, 16, 4),
        "rows": (8, 4, 4),
    }
    monkeypatch.setattr(triton_launch, "INTERPRETER_BLOCKS", blocks)
    if DEVICE == "cuda":
        for dtype in (torch.float32, torch.float64):
            monkeypatch.setitem(triton_launch.GPU_BLOCKS, dtype, blocks)


def test_status_and_supports():
    ok, detail = triton_launch.status()
    assert ok, detail
    assert triton_launch.supports("rkd_angle_loss", DEVICE, torch.float32)
    assert triton_launch.supports("fidelity_kernel_matrix", DEVICE, torch.float64)
    assert not triton_launch.supports("rkd_angle_loss", DEVICE, torch.float16)
    assert not triton_launch.supports("photonic_fidelity", DEVICE, torch.complex64)
    assert "triton" in qrkd.available_backends()


def _status_in_subprocess(code, **env):
    env = {**os.environ, **env}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_missing_triton_never_breaks_the_package():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import qrkd, torch\n"
        "from qrkd.backends import triton_launch as tl\n"
        "ok, detail = qrkd.backends.backend_status()['triton']\n"
        "s = torch.randn(5, 3, dtype=torch.float64)\n"
        "assert qrkd.rkd_angle_loss(s, s.flip(0), backend='torch').item() >= 0\n"
        "print(ok, tl.supports('rkd_angle_loss', 'cpu', torch.float32), detail)"
    )
    line = _status_in_subprocess(code)
    assert line.startswith("False False triton not importable"), line


def test_without_interpreter_cpu_tensors_are_not_supported():
    code = (
        "import torch\n"
        "from qrkd.backends import triton_launch as tl\n"
        "print(tl.status()[0], tl.supports('rkd_angle_loss', 'cpu', torch.float32))"
    )
    assert _status_in_subprocess(code, CUDA_VISIBLE_DEVICES="") == "False False"


def compile_all_for_sm90():
    """AOT-compiles every kernel variant the launcher uses (GPU_BLOCKS) for sm_90 with the installed triton and its
    bundled ptxas: compile errors of the GPU path show up on a machine without a GPU. Needs the kernels jitted, not
    interpreted: run it in a process without TRITON_INTERPRET. Returns the failures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qrkd import kernels as k

    failures = []

    def build(fn, data, constexprs, warps, float64_ptrs=()):
        sig = {}
        for name in fn.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*fp64" if name in float64_ptrs else data
            else:
                sig[name] = "i32"
        try:
            triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps})
        except Exception as exc:
            failures.append(f"{fn.__name__} {data} {constexprs}: {type(exc).__name__}: {exc}")

    for dtype, data in ((torch.float32, "*fp32"), (torch.float64, "*fp64")):
        blocks = triton_launch.GPU_BLOCKS[dtype]
        bi, bj, bd, w = blocks["sq"]
        for stats, zd in ((False, False), (True, False), (True, True)):
            c = {"STATS": stats, "ZERO_DIAG": zd, "BLOCK_I": bi, "BLOCK_J": bj, "BLOCK_D": bd}
            build(k.common.pairwise_sq_dist_kernel, data, c, w, ("stats_ptr",) if stats else ())
        bu, bv, bd, w = blocks["pair"]
        for lap in (True, False):
            build(k.common.pair_matmul_kernel, data, {"LAPLACIAN": lap, "BLOCK_U": bu, "BLOCK_V": bv, "BLOCK_D": bd}, w)
        bi, bj, w = blocks["tail"]
        for bw in (False, True):
            for zd in (False, True):
                c = {"BACKWARD": bw, "ZERO_DIAG": zd, "BLOCK_I": bi, "BLOCK_J": bj}
                build(k.rkd_distance.distance_tail_kernel, data, c, w, () if bw else ("part_ptr",))
        ba, b, w = triton_launch.GPU_BLOCKS[torch.float64]["angle"]  # q is float64 for either feature dtype
        for bw in (False, True):
            c = {"BACKWARD": bw, "BLOCK_A": ba, "BLOCK": b, "WORK_F32": dtype == torch.float32}
            float64_ptrs = ("qs_ptr", "qt_ptr", "part_ptr") + (() if bw else ("g_ptr",))
            build(k.rkd_angle.angle_triplet_kernel, data, c, w, float64_ptrs)
        bn, bd, w = blocks["rows"]
        build(k.fidelity.normalize_rows_kernel, data, {"BLOCK_N": bn, "BLOCK_D": bd}, w)
        build(k.fidelity.normalize_rows_backward_kernel, data, {"BLOCK_N": bn, "BLOCK_D": bd}, w)
        bi, bj, bd, w = blocks["fid"]
        for mode in range(4):
            c = {"MODE": mode, "BLOCK_I": bi, "BLOCK_J": bj, "BLOCK_D": bd}
            build(k.fidelity.fidelity_tile_kernel, data, c, w, ("part_ptr",) if mode == 1 else ())
    return failures


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "import test_triton_backend as t\n"
        "failures = t.compile_all_for_sm90()\n"
        "print('\\n'.join(failures)); print(len(failures))"
    )
    last = _status_in_subprocess(code)
    assert last == "0", last


def test_auto_never_picks_the_interpreter_for_cpu_tensors():
    from qrkd import backends

    assert backends.auto_backend_name("rkd_angle_loss", "cpu", torch.float32) != "triton"


@pytest.mark.parametrize("relation", RELATIONS)
def test_parity_with_many_programs(relation, small_blocks):
    # 21 rows, D = 19: partial tiles at every edge, 3 x 3 tile grids, 6 anchor chunks
    parity(relation, make_features(21, 19, "duplicates", seed=7), make_features(21, 23, seed=8), grad_output=0.5)


def test_three_times_loss_backward():
    s, t = on_device(make_features(9, 5, seed=11), make_features(9, 3, seed=12))
    for name in ("rkd_angle_loss", "rkd_distance_loss", "fidelity_kernel_loss"):
        x = s.clone().requires_grad_(True)
        (3.0 * getattr(qrkd, name)(x, t, backend="triton")).backward()
        y = s.clone().requires_grad_(True)
        (3.0 * getattr(qrkd, name)(y, t, backend="reference")).backward()
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-14)


def check_fidelity_matrix(x, upstream, tolerances):
    """The kernel matrix and its gradient against the reference's, per (dtype, tolerance of K, of the gradient relative
    to its largest entry)."""
    for dtype, k_tol, g_tol in tolerances:
        a = x.to(dtype).requires_grad_(True)
        b = x.to(dtype).requires_grad_(True)
        k, k_ref = triton_launch.fidelity_kernel_matrix(a), reference.fidelity_kernel_matrix(b)
        torch.testing.assert_close(k, k_ref, rtol=k_tol, atol=k_tol)
        (g,) = torch.autograd.grad(k, a, upstream.to(dtype))
        (g_ref,) = torch.autograd.grad(k_ref, b, upstream.to(dtype))
        torch.testing.assert_close(g, g_ref, rtol=0, atol=g_tol * g_ref.abs().max().item())


def test_fidelity_matrix_parity_and_gradcheck():
    x = make_features(19, 7, "zero_rows", seed=15)
    (x,) = on_device(x)
    upstream = torch.randn(19, 19, dtype=torch.float64, generator=torch.Generator().manual_seed(16)).to(DEVICE)
    check_fidelity_matrix(x, upstream, ((torch.float64, 1e-12, 1e-10), (torch.float32, 2e-6, 1e-4)))
    small = make_features(5, 3, seed=17).to(DEVICE).requires_grad_(True)
    assert torch.autograd.gradcheck(triton_launch.fidelity_kernel_matrix, (small,))
    # through the public API as well
    torch.testing.assert_close(qrkd.fidelity_kernel_matrix(x, backend="triton"), reference.fidelity_kernel_matrix(x))


@pytest.mark.parametrize("ranges", [[(0, 1), (1, 8), (8, 8), (8, 13)], [(0, 13)], [(5, 6), (12, 13)]])
def test_angle_anchor_ranges(ranges):
    s, t = on_device(make_features(13, 5, "duplicates", seed=18), make_features(13, 7, seed=19))
    for dtype, rtol, gtol in ((torch.float64, 1e-10, 1e-8), (torch.float32, 1e-5, 1e-5)):
        x = s.to(dtype).requires_grad_(True)
        y = s.to(dtype).requires_grad_(True)
        got = sum(qrkd.rkd_angle_loss(x, t.to(dtype), anchors=r, backend="triton") for r in ranges)
        want = sum(reference.rkd_angle_loss(y, t.to(dtype), a, b) for a, b in ranges)
        (g,) = torch.autograd.grad(got, x)
        (g_ref,) = torch.autograd.grad(want, y)
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-12)
        torch.testing.assert_close(g, g_ref, rtol=0, atol=gtol * g_ref.abs().max().item() + 1e-14)


def test_angle_anchor_shares_add_up_to_the_loss(small_blocks):
    s, t = on_device(make_features(21, 4, "zero_rows", seed=20), make_features(21, 6, seed=21))
    check_angle_shares_add_up(triton_launch, s, t, [(0, 3), (3, 3), (3, 17), (17, 21)])
    x = s.clone().requires_grad_(True)
    empty = triton_launch.rkd_angle_loss(x, t, 4, 4)
    (g_empty,) = torch.autograd.grad(empty, x)
    assert empty.item() == 0.0 and g_empty.abs().max().item() == 0.0
    with pytest.raises(ValueError, match="anchor"):
        triton_launch.rkd_angle_loss(x, t, 5, 22)


def test_non_contiguous_inputs_and_student_without_grad():
    base = make_features(11, 12, seed=28).to(DEVICE)
    s, t = base[:, ::2], base[:, 1::2]  # strided views
    for name in ("rkd_distance_loss", "rkd_angle_loss", "fidelity_kernel_loss"):
        got = getattr(triton_launch, name)(s, t)
        want = getattr(reference, name)(s, t)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_public_api_dispatches_to_triton():
    s, t = on_device(make_features(10, 4, seed=29), make_features(10, 6, seed=30))
    for name in ("rkd_distance_loss", "rkd_angle_loss", "fidelity_kernel_loss"):
        got = getattr(qrkd, name)(s, t, backend="triton")
        want = getattr(qrkd, name)(s, t, backend="reference")
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    # half precision is computed in float32 by the functional layer
    got = qrkd.rkd_angle_loss(s.half(), t.half(), backend="triton")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, qrkd.rkd_angle_loss(s.half(), t.half(), backend="reference"))


# ------------------------------------------------------------------------------------------------- GPU full grid

GPU_N = [1, 2, 3, 17, 128, 300, 1024]
GPU_D = [1, 4, 31, 130]
GPU_DT = {1: 4, 4: 31, 31: 130, 130: 1}  # Ds != Dt everywhere; fidelity truncates to the smaller


@pytest.mark.gpu
@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("d", GPU_D)
@pytest.mark.parametrize("n", GPU_N)
def test_gpu_parity_grid(relation, n, d):
    s = make_features(n, d, seed=100 + n).cuda()
    t = make_features(n, GPU_DT[d], seed=200 + n).cuda()
    check_parity(relation, triton_launch, s, t)


@pytest.mark.gpu
@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("kind", ["duplicates", "zero_rows", "shifted"])
@pytest.mark.parametrize("n", [17, 300, 1024])
def test_gpu_parity_special_inputs(relation, kind, n):
    check_parity(relation, triton_launch, make_features(n, 31, kind, seed=3).cuda(), make_features(n, 7, seed=4).cuda())
    check_parity(relation, triton_launch, make_features(n, 6, seed=5).cuda(), make_features(n, 130, kind, seed=6).cuda())


@pytest.mark.gpu
@pytest.mark.parametrize("relation", RELATIONS)
def test_gpu_grad_output_and_gradcheck(relation):
    s, t = make_features(300, 31, seed=7).cuda(), make_features(300, 4, seed=8).cuda()
    check_parity(relation, triton_launch, s, t, grad_output=3.0)
    fn = loss_fn(triton_launch, relation)
    small_t = make_features(6, 5, seed=9).cuda()
    small_s = make_features(6, 3, seed=10).cuda().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: fn(x, small_t), (small_s,))


@pytest.mark.gpu
@pytest.mark.parametrize("n", [17, 300, 1024])
def test_gpu_fidelity_matrix(n):
    x = make_features(n, 31, "zero_rows", seed=11).cuda()
    upstream = torch.randn(n, n, dtype=torch.float64, device="cuda")
    check_fidelity_matrix(x, upstream, ((torch.float64, 1e-10, 1e-10), (torch.float32, 1e-4, 1e-4)))


@pytest.mark.gpu
@pytest.mark.parametrize("n", [300, 1024])
def test_gpu_angle_anchor_ranges(n):
    s, t = make_features(n, 31, "duplicates", seed=12).cuda(), make_features(n, 130, seed=13).cuda()
    cuts = [0, 1, n // 3, n // 3, n - 7, n]
    ranges = list(zip(cuts[:-1], cuts[1:]))
    x = s.clone().requires_grad_(True)
    y = s.clone().requires_grad_(True)
    got = sum(triton_launch.rkd_angle_loss(x, t, a, b) for a, b in ranges)
    (g,) = torch.autograd.grad(got, x)
    want = reference.rkd_angle_loss(y, t)
    (g_ref,) = torch.autograd.grad(want, y)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-8 * g_ref.abs().max().item())
