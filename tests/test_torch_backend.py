"""What is specific to the pure-torch backend and the reference; the contract every backend meets (parity with the
reference, special inputs, gradients, gradcheck, identical rows, non-finite input, anchor ranges) is checked for both
in tests/test_backend_contract.py."""

import pytest
import torch

from qrkd.backends import reference


def test_angle_values_match_the_seed_formula_on_degenerate_triplets():
    # b == c coincident with x_b != x_a gives 1; x_b == x_a gives 0 (DESIGN.md 3.3)
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    angles = reference.triplet_angles(x).view(3, 3, 3)
    assert angles[0, 1, 2].item() == pytest.approx(1.0)
    assert angles[1, 2, 0].item() == 0.0 and angles[1, 1, 0].item() == 0.0
