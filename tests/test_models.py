import pytest
import torch

from qrkd.models import (
    CheckpointError,
    StudentCNN,
    TeacherCNN,
    count_parameters,
    load_checkpoint,
    save_checkpoint,
)


@pytest.mark.parametrize(
    "cls, channels, size, params, features",
    [
        (TeacherCNN, 1, 28, 6690, 31),
        (StudentCNN, 1, 28, 1725, 4),
        (TeacherCNN, 3, 32, 6708, 31),
        (StudentCNN, 3, 32, 2067, 4),
    ],
)
def test_parameter_counts_and_shapes(cls, channels, size, params, features):
    model = cls(in_channels=channels)
    assert count_parameters(model) == params
    logits, feats = model(torch.randn(5, channels, size, size))
    assert logits.shape == (5, 10) and feats.shape == (5, features)
    assert (feats >= 0).all()  # features are taken after the ReLU


def test_layers_follow_the_design():
    s = StudentCNN()
    assert s.conv1.bias is None and s.conv2.bias is None and s.conv3.bias is None
    assert s.conv3.out_channels == 12 and s.fc1.in_features == 192
    assert torch.count_nonzero(s.fc1.bias) == 0 and torch.count_nonzero(s.head.bias) == 0
    # Kaiming-uniform with ReLU gain: bound = sqrt(6 / fan_in)
    fan_in = s.conv1.weight[0].numel()
    assert s.conv1.weight.abs().max() <= (6 / fan_in) ** 0.5
    assert s.conv1.weight.abs().max() > 0.8 * (6 / fan_in) ** 0.5


def test_same_seed_same_weights():
    torch.manual_seed(1)
    a = TeacherCNN()
    torch.manual_seed(1)
    b = TeacherCNN()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_checkpoint_round_trip(tmp_path):
    model = StudentCNN(in_channels=3)
    path = tmp_path / "ckpt" / "student.pt"
    save_checkpoint(model, path, variant="kd", test_acc=91.5)
    loaded, meta = load_checkpoint(path, arch="StudentCNN", in_channels=3)
    assert meta == {"variant": "kd", "test_acc": 91.5}
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x)[0], loaded(x)[0])


def test_checkpoint_errors(tmp_path):
    path = tmp_path / "teacher.pt"
    save_checkpoint(TeacherCNN(), path)
    with pytest.raises(CheckpointError, match="arch='TeacherCNN', expected arch='StudentCNN'"):
        load_checkpoint(path, arch="StudentCNN")
    with pytest.raises(CheckpointError, match="in_channels=1, expected in_channels=3"):
        load_checkpoint(path, in_channels=3)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a readable qrkd checkpoint"):
        load_checkpoint(corrupt)

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not a qrkd checkpoint"):
        load_checkpoint(foreign)

    import argparse

    unsafe = tmp_path / "unsafe.pt"  # an arbitrary pickled object: weights_only=True refuses it
    torch.save({"format": "qrkd-checkpoint", "obj": argparse.Namespace(a=1)}, unsafe)
    with pytest.raises(CheckpointError, match="not a readable qrkd checkpoint"):
        load_checkpoint(unsafe)

    mismatched = tmp_path / "mismatched.pt"
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["fc1.weight"] = torch.zeros(5, 192)
    torch.save(payload, mismatched)
    with pytest.raises(CheckpointError, match="does not fit TeacherCNN"):
        load_checkpoint(mismatched)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="in_channels"):
        TeacherCNN(in_channels=0)
    with pytest.raises(TypeError, match="num_classes"):
        StudentCNN(num_classes=2.5)
