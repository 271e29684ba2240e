"""qrkd in torchdistill: the registered losses against torchdistill's own, the models, and the example configs run
through torchdistill's machinery (examples/torchdistill/run.py) on tiny MNIST-format data."""

import copy
import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 12):
    # torchdistill 1.1.5 requires torch >= 2.12; the GPU machine's image has torch 2.11 and no torchdistill. Elsewhere
    # the import below is plain: the dev extra installs torchdistill, and a missing one fails loudly.
    pytest.skip("torchdistill 1.1.5 needs torch >= 2.12", allow_module_level=True)

from torchdistill.losses.mid_level import RKDLoss as TorchdistillRKDLoss
from torchdistill.losses.registry import MIDDLE_LEVEL_LOSS_DICT
from torchdistill.models.registry import MODEL_DICT

import qrkd
import qrkd.integrations.torchdistill as qtd
from qrkd.models import StudentCNN, TeacherCNN, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "torchdistill"
BACKENDS = [b for b in qrkd.available_backends() if b != "triton"]  # triton runs on CPU only under the interpreter


def io(x, path="features"):
    return {path: {"output": x}}


def rkd_kwargs(**overrides):
    kwargs = dict(student_output_path="features", teacher_output_path="features", dist_factor=1.0, angle_factor=2.0,
                  reduction="mean")
    kwargs.update(overrides)
    return kwargs


def value_and_grad(loss_module, student, teacher):
    student = student.detach().clone().requires_grad_(True)
    loss = loss_module(io(student), io(teacher), None)
    loss.backward()
    return loss.detach(), student.grad


# ----------------------------------------------------------------------------------------------- registration


def test_importing_qrkd_does_not_import_torchdistill():
    code = "import sys, qrkd, qrkd.losses, qrkd.models; assert 'torchdistill' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_losses_and_models_are_registered_beside_torchdistills_own():
    assert MIDDLE_LEVEL_LOSS_DICT["qrkd.RKDLoss"] is qtd.RKDLoss
    assert MIDDLE_LEVEL_LOSS_DICT["qrkd.FidelityKernelLoss"] is qtd.FidelityKernelLoss
    assert MIDDLE_LEVEL_LOSS_DICT["qrkd.DistillationLoss"] is qtd.DistillationLoss
    assert MIDDLE_LEVEL_LOSS_DICT["RKDLoss"] is TorchdistillRKDLoss
    assert MODEL_DICT["qrkd.TeacherCNN"] is qtd.teacher_cnn and MODEL_DICT["qrkd.StudentCNN"] is qtd.student_cnn


# --------------------------------------------------------------------------------------- RKD: parity with torchdistill


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n,ds,dt", [(2, 1, 3), (3, 4, 4), (17, 4, 31), (33, 130, 7)])
def test_rkd_loss_equals_torchdistills_rkd_loss_float64(backend, reduction, n, ds, dt):
    generator = torch.Generator().manual_seed(n * 1000 + ds)
    student = torch.randn(n, ds, dtype=torch.float64, generator=generator)
    teacher = torch.randn(n, dt, dtype=torch.float64, generator=generator) * 3 + 1
    kwargs = rkd_kwargs(reduction=reduction)
    want, want_grad = value_and_grad(TorchdistillRKDLoss(**kwargs), student, teacher)
    got, got_grad = value_and_grad(qtd.RKDLoss(**kwargs, backend=backend), student, teacher)
    assert got.dtype == torch.float64
    # N = 2: every normalised distance is 1 and every angle 0 or 1, so the loss is 0 up to rounding
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-8 * want_grad.abs().max().item() + 1e-14)


@pytest.mark.parametrize("dist_factor,angle_factor", [(0.5, 0.0), (0.0, 0.7), (None, 1.0), (0.3, None)])
def test_rkd_loss_single_terms_equal_torchdistills(dist_factor, angle_factor):
    generator = torch.Generator().manual_seed(7)
    student = torch.randn(9, 3, 2, dtype=torch.float64, generator=generator)  # flattened to 9 x 6, as torchdistill does
    teacher = torch.randn(9, 5, dtype=torch.float64, generator=generator)
    kwargs = rkd_kwargs(dist_factor=dist_factor, angle_factor=angle_factor)
    ours = qtd.RKDLoss(**kwargs)
    if dist_factor is None or angle_factor is None:  # torchdistill multiplies its None factor and fails
        theirs = TorchdistillRKDLoss(**rkd_kwargs(dist_factor=dist_factor or 0.0, angle_factor=angle_factor or 0.0))
    else:
        theirs = TorchdistillRKDLoss(**kwargs)
    want, want_grad = value_and_grad(theirs, student, teacher)
    got, got_grad = value_and_grad(ours, student, teacher)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-8 * want_grad.abs().max().item())


def test_rkd_loss_float32_close_to_torchdistills():
    generator = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(128, 4, generator=generator), torch.randn(128, 31, generator=generator)
    want = TorchdistillRKDLoss(**rkd_kwargs())(io(student.double()), io(teacher.double()))
    got = qtd.RKDLoss(**rkd_kwargs())(io(student), io(teacher))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=0)


def test_rkd_loss_coincident_points_send_no_exploding_gradient():
    """Two all-zero feature rows (dead ReLU units): torchdistill's angle term differentiates 0 / 1e-12 there; qrkd
    keeps the same value and a bounded gradient (DESIGN.md 3.3)."""
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(8, 4, dtype=torch.float64, generator=generator)
    student[2] = student[5] = 0.0
    teacher = torch.randn(8, 6, dtype=torch.float64, generator=generator)
    kwargs = rkd_kwargs(dist_factor=0.0, angle_factor=1.0)
    want, want_grad = value_and_grad(TorchdistillRKDLoss(**kwargs), student, teacher)
    got, got_grad = value_and_grad(qtd.RKDLoss(**kwargs), student, teacher)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    assert want_grad.abs().max() > 1e6  # torchdistill's
    assert torch.isfinite(got_grad).all() and got_grad.abs().max() < 10


def test_rkd_loss_seed_convention_is_qrkds_distance_loss():
    generator = torch.Generator().manual_seed(11)
    student, teacher = torch.randn(10, 4, generator=generator), torch.randn(10, 8, generator=generator)
    loss = qtd.RKDLoss(**rkd_kwargs(dist_factor=1.0, angle_factor=0.0), zero_diagonal=False)
    torch.testing.assert_close(loss(io(student), io(teacher)), qrkd.rkd_distance_loss(student, teacher))


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(reduction="none"), ValueError, "reduction"),
        (dict(reduction="batchmean"), ValueError, "reduction"),
        (dict(dist_factor=-1.0), ValueError, "dist_factor"),
        (dict(angle_factor="2"), TypeError, "angle_factor"),
        (dict(student_output_path=3), TypeError, "student_output_path"),
    ],
)
def test_rkd_loss_bad_arguments(overrides, error, match):
    with pytest.raises(error, match=match):
        qtd.RKDLoss(**rkd_kwargs(**overrides))


def test_rkd_loss_unknown_keyword_is_an_error():
    with pytest.raises(TypeError, match="angle_facter"):
        qtd.RKDLoss(**rkd_kwargs(), angle_facter=1.0)


# ---------------------------------------------------------------------------------- fidelity and the seed's loss


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fidelity_kernel_loss_is_qrkds(reduction):
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(12, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = torch.randn(12, 31, dtype=torch.float64, generator=generator)
    got = qtd.FidelityKernelLoss("features", "features", reduction=reduction)(io(student), io(teacher))
    want = qrkd.fidelity_kernel_loss(student, teacher) * (12**2 if reduction == "sum" else 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    got.backward()
    assert student.grad.abs().sum() > 0


def test_fidelity_kernel_loss_photonic_matches_the_seeds_distillation_loss():
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(6, 4, generator=generator)
    teacher = torch.randn(6, 31, generator=generator)
    loss = qtd.FidelityKernelLoss("features", "features", kernel="merlin", n_modes=10, n_photons=5)
    seed = qrkd.DistillationLoss(kd=0, dr=0, ar=0, qk=1.0, qk_backend="merlin", qk_n_modes=10, qk_n_photons=5)
    torch.testing.assert_close(loss(io(student), io(teacher)), seed(None, None, student, teacher))


def test_distillation_loss_is_the_seeds_on_io_dicts():
    generator = torch.Generator().manual_seed(6)
    logits_s, logits_t = torch.randn(16, 10, generator=generator), torch.randn(16, 10, generator=generator)
    feat_s, feat_t = torch.randn(16, 4, generator=generator), torch.randn(16, 31, generator=generator)
    kwargs = dict(kd=0.5, dr=0.1, ar=0.1, qk=0.1, qk_backend="simple", temperature=4.0, kd_alpha=0.5)
    loss = qtd.DistillationLoss(**kwargs)
    student_io = {".": {"output": logits_s}, "features": {"output": feat_s}}
    teacher_io = {".": {"output": logits_t}, "features": {"output": feat_t}}
    got = loss(student_io, teacher_io, None)
    torch.testing.assert_close(got, qrkd.DistillationLoss(**kwargs)(logits_s, logits_t, feat_s, feat_t))
    assert set(loss.last_terms) == {"kd", "rkd_distance", "rkd_angle", "qk"}


# ------------------------------------------------------------------------------------------------------ models


def test_models_return_logits_and_expose_features_to_a_hook():
    torch.manual_seed(0)
    model = qtd.student_cnn()
    assert isinstance(model.model, StudentCNN)
    seen = {}
    model.features.register_forward_hook(lambda module, inputs, output: seen.setdefault("features", output))
    x = torch.randn(3, 1, 28, 28)
    logits = model(x)
    want_logits, want_features = model.model(x)
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(seen["features"], want_features)
    assert seen["features"].shape == (3, 4)


def test_teacher_from_a_qrkd_checkpoint(tmp_path):
    teacher = TeacherCNN()
    save_checkpoint(teacher, tmp_path / "teacher.pt")
    model = qtd.teacher_cnn(checkpoint=tmp_path / "teacher.pt")
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(model.model.state_dict()[key], value)
    with pytest.raises(ValueError, match="arch"):
        qtd.student_cnn(checkpoint=tmp_path / "teacher.pt")


# ----------------------------------------------------------------------------------- the example configurations


def write_idx(path: Path, array: torch.Tensor) -> None:
    magic = 0x800 + array.dim()
    header = struct.pack(">I" + "I" * array.dim(), magic, *array.shape)
    path.write_bytes(header + array.to(torch.uint8).numpy().tobytes())


def write_tiny_mnist(root: Path, n_train: int, n_test: int) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        images = torch.randint(0, 128, (n, 28, 28), generator=generator)
        for image, label in zip(images, labels.tolist()):  # a stripe per class; the tests check plumbing, not learning
            image[4:24, 4 + 2 * label:6 + 2 * label] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


def load_runner():
    spec = importlib.util.spec_from_file_location("qrkd_torchdistill_run", EXAMPLES / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """Loads an example config against tiny MNIST files (48 training and 32 test images): batch 16, one epoch, so a
    run is 3 iterations; its checkpoints go to a temporary folder."""
    root = tmp_path_factory.mktemp("torchdistill")
    write_tiny_mnist(root / "data", n_train=48, n_test=32)
    runner = load_runner()

    def load(name: str, **loss_key):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("QRKD_DATA_ROOT", str(root / "data"))
            config = runner.load_config(EXAMPLES / name)
        config["train"]["num_epochs"] = 1
        config["train"]["train_data_loader"]["kwargs"]["batch_size"] = 16
        for model_config in config["models"].values():
            for key in ("src_ckpt", "dst_ckpt"):
                if model_config.get(key):
                    model_config[key] = str(root / model_config[key])
        return config

    teacher = runner.run(load("mnist_teacher.yaml"), seed=0)
    return runner, load, teacher


def test_teacher_config_trains_the_seeds_teacher(examples):
    runner, load, teacher = examples
    assert len(teacher["losses"]) == 3 and all(torch.isfinite(torch.tensor(teacher["losses"])))
    assert isinstance(teacher["model"].model, TeacherCNN)
    assert Path(load("mnist_teacher.yaml")["models"]["model"]["dst_ckpt"]).is_file()
    assert 0 <= teacher["test_accuracy"]["model"] <= 100


@pytest.mark.parametrize("name,term,cls", [("mnist_rkd.yaml", "rkd", qtd.RKDLoss),
                                           ("mnist_qrkd.yaml", "qrkd", qtd.DistillationLoss)])
def test_distillation_configs_run_through_torchdistill(examples, name, term, cls):
    runner, load, teacher = examples
    config = load(name)
    initial = {}

    def get_distillation_box(teacher_model, student_model, *args):
        initial.update(copy.deepcopy(student_model.state_dict()))
        return torchdistill_box(teacher_model, student_model, *args)

    torchdistill_box = runner.get_distillation_box
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "get_distillation_box", get_distillation_box)
        result = runner.run(config, seed=0)
    criterion, _weight = result["criterion"].term_dict[term]
    assert isinstance(criterion, cls)
    assert len(result["losses"]) == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert isinstance(result["model"].model, StudentCNN)
    trained = result["model"].state_dict()
    assert initial.keys() == trained.keys()
    assert all(not torch.equal(initial[k], trained[k]) for k in initial)  # every student parameter was trained
    teacher_model = runner.build_model(config["models"]["teacher_model"], "cpu", role="teacher")
    trained_teacher = teacher["model"]
    for a, b in zip(teacher_model.parameters(), trained_teacher.parameters()):
        assert torch.equal(a, b)  # the distillation read the teacher checkpoint, and left the teacher alone
    assert result["test_accuracy"]["teacher"] == teacher["test_accuracy"]["model"]


def test_rkd_config_switches_to_torchdistills_rkd_loss_by_its_name(examples):
    runner, load, _ = examples
    first_losses = {}
    for key in ("qrkd.RKDLoss", "RKDLoss"):
        config = load("mnist_rkd.yaml")
        config["train"]["criterion"]["kwargs"]["sub_terms"]["rkd"]["criterion"]["key"] = key
        result = runner.run(config, seed=0)
        rkd_term = result["criterion"].term_dict["rkd"][0]
        assert type(rkd_term) is (qtd.RKDLoss if key == "qrkd.RKDLoss" else TorchdistillRKDLoss)
        first_losses[key] = result["losses"][0]  # same weights and batch: before the first step the runs agree
    assert first_losses["qrkd.RKDLoss"] == pytest.approx(first_losses["RKDLoss"], rel=1e-5)


def test_distillation_without_the_teacher_checkpoint_is_an_error(examples, tmp_path):
    runner, load, _ = examples
    config = load("mnist_rkd.yaml")
    config["models"]["teacher_model"]["src_ckpt"] = str(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="teacher checkpoint"):
        runner.run(config, seed=0)
