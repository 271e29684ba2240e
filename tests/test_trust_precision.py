"""Precision where the formulas cancel (issue 9, item 4; DESIGN.md sections 3 and 6).

Distances and angles are translation invariant, but Gram formulas and the law of cosines lose digits on features with
a large common offset (typical after a ReLU), on duplicate and nearly coincident rows, and on (nearly) collinear or
one-dimensional features. Every fast backend, called through the public functions, must be no worse than twice the
seed formula's own error (the `reference` backend) plus a floor, in float32 and in float64.

The truth is the reference's formulas in float64 on the exact inputs a backend sees (float32 inputs upcast), with the
squared distances of the distance loss summed from differences: the reference's float64 Gram formula is itself off by
up to 1e-10 relative on values and 1e-7 on gradients on offset, duplicate or one-dimensional features.

Floors (DESIGN.md section 6), float32 / float64: values 2e-5 / 1e-10 relative plus 1e-10 / 1e-15 absolute (where
the true loss is 0); gradients 1e-5 / 1e-8 of a gradient scale plus 1e-6 / 1e-15 absolute. The gradient scale is
max|true gradient|, or, where that vanishes (below 1e-3 of it: collinear and one-dimensional features, where every
angle is +-1 and stays so), the size of a generic gradient at this feature scale, 1 / (N mu) with mu the mean distance
between the student's points: each row's gradient sums about N terms of size 1 / (N^2 mu), for both losses.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import qrkd
from qrkd import functional as Fq
from qrkd.backends import reference

AVAILABLE = qrkd.available_backends()
CPU_FAST = [name for name in ("torch", "cpp") if name in AVAILABLE]
RELATIONS = ("distance", "distance_zero_diag", "angle")
# dtype: (relative value floor, absolute value floor, gradient floor relative to the scale, absolute gradient floor)
FLOORS = {torch.float64: (1e-10, 1e-15, 1e-8, 1e-15), torch.float32: (2e-5, 1e-10, 1e-5, 1e-6)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # the cases are small: on a busy machine, intra-op threads only add waiting
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def device_of(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def loss(relation, s, t, backend, anchors=None):
    if relation == "distance":
        return Fq.rkd_distance_loss(s, t, zero_diagonal=False, backend=backend)
    if relation == "distance_zero_diag":
        return Fq.rkd_distance_loss(s, t, zero_diagonal=True, backend=backend)
    return Fq.rkd_angle_loss(s, t, backend=backend, anchors=anchors)


def value_and_grad(relation, s, t, backend, device="cpu"):
    x = s.detach().clone().to(device).requires_grad_(True)
    value = loss(relation, x, t.to(device), backend)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach().cpu().double(), grad.cpu().double()


def exact_distances(x, zero_diagonal):
    d = (x.unsqueeze(1) - x.unsqueeze(0)).pow(2).sum(dim=2).clamp(min=reference.EPS).sqrt()
    return d.masked_fill(torch.eye(len(x), dtype=torch.bool), 0.0) if zero_diagonal else d


def truth(relation, s, t):
    """The reference's formulas in float64 on the exact inputs, the distances summed from differences."""
    s, t = s.double(), t.double()
    if relation == "angle":
        return value_and_grad(relation, s, t, "reference")
    zero_diagonal = relation == "distance_zero_diag"
    normalised = reference._normalise_by_mean  # the seed's normaliser: the mean of the positive entries
    x = s.requires_grad_(True)
    value = F.smooth_l1_loss(
        normalised(exact_distances(x, zero_diagonal)), normalised(exact_distances(t, zero_diagonal))
    )
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


def gradient_scale(s, true_grad):
    """max|true gradient|, or the generic size 1 / (N mu) where the true gradient vanishes (below 1e-3 of it)."""
    s = s.double()
    d = torch.cdist(s, s)
    positive = d[d > 0]
    generic = 1.0 / (len(s) * positive.mean().item()) if positive.numel() else 0.0
    largest = true_grad.abs().max().item()
    return largest if largest >= 1e-3 * generic else generic


def check_precision(relation, backend, s64, t64):
    """The criterion of the module docstring in float64 and in float32; returns the measured errors per dtype."""
    errors = {}
    for dtype, (value_floor, zero_value_floor, grad_floor, zero_grad_floor) in FLOORS.items():
        s, t = s64.to(dtype), t64.to(dtype)
        true_v, true_g = truth(relation, s, t)
        scale = gradient_scale(s, true_g)
        ref_v, ref_g = value_and_grad(relation, s, t, "reference")
        v, g = value_and_grad(relation, s, t, backend, device_of(backend))
        assert torch.isfinite(v) and torch.isfinite(g).all()
        ref_err_v, ref_err_g = abs(ref_v.item() - true_v.item()), (ref_g - true_g).abs().max().item()
        err_v, err_g = abs(v.item() - true_v.item()), (g - true_g).abs().max().item()
        assert err_v <= 2 * ref_err_v + value_floor * abs(true_v.item()) + zero_value_floor, (
            f"{dtype} value error {err_v:.3g}, the reference's own {ref_err_v:.3g} (loss {true_v.item():.3g})"
        )
        assert err_g <= 2 * ref_err_g + grad_floor * scale + zero_grad_floor, (
            f"{dtype} gradient error {err_g:.3g}, the reference's own {ref_err_g:.3g} (scale {scale:.3g})"
        )
        errors[dtype] = (err_v, err_g)
    return errors


def features(kind, n, d, seed):
    """float64 features of one family: offset (mean 3, spread 0.01, as after a ReLU), far (mean 100, spread 1),
    duplicates and near_duplicates (offset, with repeated rows), collinear (offset, on one line), random."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    if kind == "random":
        return z
    if kind == "far":
        return 100.0 + z
    x = 3.0 + 0.01 * z
    if kind == "collinear":
        along = torch.randn(n, 1, generator=g, dtype=torch.float64)
        x = 3.0 + 0.01 * along * torch.randn(1, d, generator=g, dtype=torch.float64)
    elif kind == "duplicates" and n >= 3:
        x[n // 2] = x[0]
        x[n - 1] = x[1]
    elif kind == "near_duplicates" and n >= 2:
        x[n - 1] = x[0] + 1e-4 * z[n - 1]
    return x


def pair(kind, n, ds=4, dt=31, seed=0):
    return features(kind, n, ds, seed), features(kind, n, dt, seed + 1)


def test_fast_backends_are_checked():
    assert "torch" in CPU_FAST


# --------------------------------------------------------------------------------------------- deterministic cases


CANCELLING = [(kind, n) for kind in ("offset", "far", "duplicates", "near_duplicates", "collinear") for n in (3, 17)]
CANCELLING += [(kind, 128) for kind in ("offset", "near_duplicates", "collinear")]


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("kind, n", CANCELLING)
@pytest.mark.parametrize("backend", CPU_FAST)
def test_precision_on_cancelling_inputs(backend, kind, n, relation):
    check_precision(relation, backend, *pair(kind, n, seed=1))


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("kind", ["offset", "random"])
@pytest.mark.parametrize("n", [2, 3, 17, 128])
@pytest.mark.parametrize("backend", CPU_FAST)
def test_precision_one_dimensional(backend, n, kind, relation):
    # one feature column on both sides: every angle is +-1 or 0, so the true angle gradient is 0
    check_precision(relation, backend, *pair(kind, n, ds=1, dt=1, seed=3))


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("kind", ["offset", "far", "random"])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("backend", CPU_FAST)
def test_precision_tiny_batches(backend, n, kind, relation):
    check_precision(relation, backend, *pair(kind, n, seed=5))


# the triton interpreter costs milliseconds per program instance and far more per launch: a few cases, N <= 17
TRITON_CASES = [
    ("angle", "offset", 17, 4),
    ("angle", "near_duplicates", 3, 4),
    ("angle", "offset", 17, 1),
    ("angle", "offset", 2, 4),
    ("distance", "offset", 17, 4),
    ("distance_zero_diag", "duplicates", 17, 1),
]


@pytest.mark.skipif("triton" not in AVAILABLE, reason="triton backend unavailable")
@pytest.mark.parametrize("relation, kind, n, ds", TRITON_CASES)
def test_precision_triton(relation, kind, n, ds):
    check_precision(relation, "triton", *pair(kind, n, ds=ds, dt=ds if ds == 1 else 31, seed=7))


@pytest.mark.parametrize("backend", CPU_FAST)
def test_offset_angle_gradient_matches_the_seed_formula(backend):
    # the example at the seed's shape: ReLU-like features (mean 3, spread 0.01), N = 128, Ds = 4, Dt = 31
    s, t = pair("offset", 128, seed=9)
    err_g = check_precision("angle", backend, s, t)[torch.float32][1]
    _, true_g = truth("angle", s.float(), t.float())
    assert err_g <= 1e-5 * true_g.abs().max().item()


@pytest.mark.parametrize("backend", CPU_FAST)
def test_angle_shares_add_up_on_offset_features(backend):
    # the features are centred on the mean of the whole batch, which every share sees: the shares still add up
    s, t = pair("offset", 17, seed=11)
    s.requires_grad_(True)
    full = Fq.rkd_angle_loss(s, t, backend=backend)
    (g_full,) = torch.autograd.grad(full, s)
    parts = [Fq.rkd_angle_loss(s, t, backend=backend, anchors=r) for r in ((0, 5), (5, 6), (6, 17))]
    (g_parts,) = torch.autograd.grad(sum(parts), s)
    torch.testing.assert_close(sum(parts), full, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(g_parts, g_full, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_features_still_give_nan(backend, relation, value):
    for side in (0, 1):
        features_ = list(pair("offset", 7, seed=13))
        features_[side][3, 1] = value
        s, t = features_
        assert torch.isnan(loss(relation, s.requires_grad_(True), t, backend)), side


def test_student_gradient_is_exact_through_the_centring():
    # the centring is part of the autograd graph: gradcheck of the public functions in float64 on offset features
    s, t = pair("offset", 6, ds=3, dt=5, seed=15)
    s.requires_grad_(True)
    for relation in RELATIONS:
        assert torch.autograd.gradcheck(lambda x: loss(relation, x, t, "torch"), (s,), eps=1e-7, atol=1e-6)


# ------------------------------------------------------------------------------------------------ property tests


@st.composite
def feature_pairs(draw):
    """Random shapes (N 1..40, D 1..8), scales (1e-2..1e2), offsets (0..1e3) and duplicated rows, as the parameters
    that `build_pair` turns into features (so that a failing example prints in full)."""
    n = draw(st.integers(1, 40))
    sides = []
    for _ in ("student", "teacher"):
        sides.append(
            {
                "d": draw(st.integers(1, 8)),
                "scale": 10.0 ** draw(st.integers(-2, 2)),
                "offset": draw(st.sampled_from([0.0, 1.0, 3.0, -3.0, 100.0, -1000.0, 1000.0])),
                "copies": draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=4)),
            }
        )
    return {"n": n, "seed": draw(st.integers(0, 2**31 - 1)), "student": sides[0], "teacher": sides[1]}


def build_pair(params):
    g = torch.Generator().manual_seed(params["seed"])
    built = []
    for side in (params["student"], params["teacher"]):
        x = side["offset"] + side["scale"] * torch.randn(params["n"], side["d"], generator=g, dtype=torch.float64)
        for src, dst in side["copies"]:
            x[dst] = x[src]
        built.append(x)
    return built


@pytest.mark.parametrize("backend", CPU_FAST)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=feature_pairs(), relation=st.sampled_from(RELATIONS))
# one-dimensional students, found by this test: every angle is +-1 and the true gradient vanishes by cancellation
@example(params={"n": 39, "seed": 13, "student": {"d": 1, "scale": 0.01, "offset": 0.0, "copies": []},
                 "teacher": {"d": 1, "scale": 1.0, "offset": 0.0, "copies": []}}, relation="angle")
@example(params={"n": 39, "seed": 13, "student": {"d": 1, "scale": 0.01, "offset": 1.0, "copies": []},
                 "teacher": {"d": 1, "scale": 1.0, "offset": 0.0, "copies": []}}, relation="angle")
def test_precision_property(backend, params, relation):
    check_precision(relation, backend, *build_pair(params))
