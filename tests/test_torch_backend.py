"""The pure-torch backend against the reference (DESIGN.md section 6)."""

import pytest
import torch

from parity import (
    RELATIONS,
    check_angle_shares_add_up,
    check_coincident_points_send_no_angle_gradient,
    check_identical_rows,
    check_parity,
    loss_fn,
    make_features,
)
from qrkd.backends import pure_torch, reference

SHAPES = [  # (N, Ds, Dt)
    (1, 4, 4),
    (2, 1, 4),
    (3, 4, 31),
    (17, 31, 4),
    (17, 130, 130),
    (128, 4, 31),
    (300, 31, 1),
]
KINDS = ["random", "duplicates", "zero_rows", "shifted"]


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity_random(relation, shape):
    n, ds, dt = shape
    check_parity(relation, pure_torch, make_features(n, ds, seed=1), make_features(n, dt, seed=2))


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("kind", KINDS[1:])
@pytest.mark.parametrize("n", [3, 17, 33])
def test_parity_special_inputs(relation, kind, n):
    # the student carries the special structure; the teacher is random (and the other way round below)
    check_parity(relation, pure_torch, make_features(n, 5, kind, seed=3), make_features(n, 7, seed=4))
    check_parity(relation, pure_torch, make_features(n, 6, seed=5), make_features(n, 4, kind, seed=6))


@pytest.mark.parametrize("relation", RELATIONS)
def test_grad_output_scales_gradient(relation):
    s, t = make_features(17, 6, seed=7), make_features(17, 9, seed=8)
    check_parity(relation, pure_torch, s, t, grad_output=-2.5)


@pytest.mark.parametrize("relation", RELATIONS)
def test_gradcheck_float64(relation):
    fn = loss_fn(pure_torch, relation)
    t = make_features(6, 5, seed=9)
    s = make_features(6, 3, seed=10).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: fn(x, t), (s,))


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("n", [1, 2, 9])
def test_identical_rows_give_zero_loss_and_zero_gradient(relation, n):
    check_identical_rows(pure_torch, relation, n)


@pytest.mark.parametrize("impl", [reference, pure_torch], ids=["reference", "torch"])
def test_angle_coincident_points_send_no_gradient(impl):
    check_coincident_points_send_no_angle_gradient(impl)


@pytest.mark.parametrize("impl", [reference, pure_torch], ids=["reference", "torch"])
def test_angle_anchor_ranges_add_up(impl):
    s, t = make_features(13, 5, "duplicates", seed=15), make_features(13, 7, seed=16)
    check_angle_shares_add_up(impl, s, t, [(0, 1), (1, 8), (8, 8), (8, 13)])


def test_angle_values_match_the_seed_formula_on_degenerate_triplets():
    # b == c coincident with x_b != x_a gives 1; x_b == x_a gives 0 (DESIGN.md 3.3)
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    angles = reference.triplet_angles(x).view(3, 3, 3)
    assert angles[0, 1, 2].item() == pytest.approx(1.0)
    assert angles[1, 2, 0].item() == 0.0 and angles[1, 1, 0].item() == 0.0


@pytest.mark.parametrize("relation", RELATIONS)
def test_nan_features_give_nan_loss(relation):
    s, t = make_features(7, 4, seed=17), make_features(7, 4, seed=18)
    s[3, 1] = float("nan")
    assert torch.isnan(loss_fn(pure_torch, relation)(s, t))
    s[3, 1] = float("inf")
    assert torch.isnan(loss_fn(pure_torch, relation)(s, t))
