"""Trains an image classifier from a torchdistill configuration with torchdistill's own machinery.

torchdistill's training entry point for image classification is a script in its repository
(examples/torchvision/image_classification.py) that its wheel does not ship. This runner plays that role with the
same library calls: torchdistill's YAML loader, its `dependencies` import hook (which registers qrkd's losses and
models), its model registry, get_distillation_box (a `teacher_model` in the config) or get_training_box (none), the
box's pre-epoch / forward / post-forward / post-epoch processes, and its checkpoint functions.

    QRKD_DATA_ROOT=../shared/data python examples/torchdistill/run.py --config examples/torchdistill/mnist_teacher.yaml
    QRKD_DATA_ROOT=../shared/data python examples/torchdistill/run.py --config examples/torchdistill/mnist_rkd.yaml

The first trains the seed's teacher, the second distils it into the seed's student (see the configs).
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
from torchdistill.common import yaml_util
from torchdistill.common.main_util import import_dependencies, load_ckpt, save_ckpt, set_seed
from torchdistill.core.distillation import get_distillation_box
from torchdistill.core.training import get_training_box
from torchdistill.datasets.util import build_data_loader
from torchdistill.misc.log import set_basic_log_config
from torchdistill.models.registry import get_model

logger = logging.getLogger("qrkd.examples.torchdistill")


def load_config(path) -> dict:
    """The configuration, read by torchdistill's loader (its !import_call etc. tags build the datasets), with its
    `dependencies` imported."""
    config = yaml_util.load_yaml_file(os.path.expanduser(os.fspath(path)))
    import_dependencies(config.get("dependencies", None))
    return config


def build_model(model_config: dict, device, *, role: str):
    """A model from torchdistill's registry, with its `src_ckpt` (a torchdistill checkpoint) loaded when given.
    torchdistill skips a missing checkpoint with a log line; a teacher without its weights is an error here."""
    model = get_model(model_config["key"], model_config.get("repo_or_dir", None), **(model_config.get("kwargs") or {}))
    src_ckpt = model_config.get("src_ckpt", None)
    if src_ckpt is not None and not os.path.isfile(src_ckpt):
        if role == "teacher":
            raise FileNotFoundError(f"teacher checkpoint {src_ckpt!r} not found: train the teacher first "
                                    "(examples/torchdistill/mnist_teacher.yaml) or point src_ckpt at its checkpoint")
        logger.info("%s checkpoint %s not found: starting from fresh weights", role, src_ckpt)
        src_ckpt = None
    if src_ckpt is not None:
        load_ckpt(src_ckpt, model=model, strict=True)
    return model.to(device)


@torch.no_grad()
def accuracy(model, data_loader, device) -> float:
    """Top-1 accuracy (%) of a model whose forward returns logits."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in data_loader:
        images, targets = batch[0].to(device), batch[1].to(device)
        correct += (model(images).argmax(dim=1) == targets).sum().item()
        total += targets.numel()
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def run(config: dict, device="cpu", seed: int | None = None) -> dict:
    """Trains the configured student (distilling from the teacher when the config names one); keeps the checkpoint
    of the best validation accuracy at the student's `dst_ckpt` and evaluates it on the test loader.

    Returns {'losses': per-iteration training losses, 'val_accuracy': per epoch, 'test_accuracy': {'model' (the
    trained model: the student when distilling), and 'teacher' when there is one}, 'criterion': the box's loss
    module, 'model': the trained model}."""
    device = torch.device(device)
    set_seed(seed)
    models_config, train_config = config["models"], config["train"]
    teacher_config = models_config.get("teacher_model", None)
    student_config = models_config.get("student_model", None) or models_config["model"]
    teacher = build_model(teacher_config, device, role="teacher") if teacher_config is not None else None
    student = build_model(student_config, device, role="student")
    dataset_dict = config["datasets"]
    if teacher is None:
        box = get_training_box(student, dataset_dict, train_config, device, None, False, 1)
    else:
        box = get_distillation_box(teacher, student, dataset_dict, train_config, device, None, False, 1)

    dst_ckpt = student_config["dst_ckpt"]
    losses, val_accuracy, best = [], [], -1.0
    for epoch in range(box.num_epochs):
        start = time.time()
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            sample_batch, targets = sample_batch.to(device), targets.to(device)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss.item()} at epoch {epoch}, step {len(losses)}")
            box.post_forward_process(loss=loss)
            losses.append(loss.item())
        val_accuracy.append(accuracy(student, box.val_data_loader, device))
        logger.info("epoch %d: mean loss %.4f, validation accuracy %.2f%%, %.1f s", epoch,
                    sum(losses[-len(box.train_data_loader):]) / len(box.train_data_loader), val_accuracy[-1],
                    time.time() - start)
        if val_accuracy[-1] > best:
            best = val_accuracy[-1]
            save_ckpt(student, box.optimizer, box.lr_scheduler, best, None, dst_ckpt)
        box.post_epoch_process()
    box.clean_modules()

    load_ckpt(dst_ckpt, model=student, strict=True)
    test_config = config["test"]["test_data_loader"]
    test_loader = build_data_loader(dataset_dict[test_config["dataset_id"]], test_config, False)
    test_accuracy = {"model": accuracy(student, test_loader, device)}
    if teacher is not None:
        test_accuracy["teacher"] = accuracy(teacher, test_loader, device)
    logger.info("test accuracy: %s (checkpoint %s)",
                ", ".join(f"{k} {v:.2f}%" for k, v in test_accuracy.items()), dst_ckpt)
    return {"losses": losses, "val_accuracy": val_accuracy, "test_accuracy": test_accuracy,
            "criterion": box.criterion, "model": student}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="torchdistill YAML configuration")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=1337, help="seed of random, numpy and torch (default 1337)")
    args = parser.parse_args(argv)
    set_basic_log_config()
    result = run(load_config(args.config), args.device, args.seed)
    print(" ".join(f"test_accuracy_{k}={v:.2f}" for k, v in result["test_accuracy"].items()))


if __name__ == "__main__":
    main()
