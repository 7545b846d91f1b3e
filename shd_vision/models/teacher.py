"""The frozen teacher, seeing the student's batch through its own input pipeline."""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.task import DistillationTeacher
from torch import Tensor, nn

from shd_vision.errors import UserError
from shd_vision.models.factory import describe, input_size
from shd_vision.models.taps import Capture, Outputs, Tap, token_layout

LUMA = (0.299, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def check_teacher_top1(top1: float, num_classes: int, floor: float) -> None:
    """Refuse to distil from a teacher near chance on this data: one trained on another data
    set, or on these classes in another order (``trainer.teacher_floor=0`` goes on anyway).

    Raises:
        UserError: naming the top-1, chance, the floor and both likely causes.
    """
    chance = 100.0 / num_classes
    if top1 >= floor * chance:
        return
    raise UserError(
        f"the teacher's top-1 on the validation set is {top1:.2f}%, near chance for {num_classes} classes "
        f"({chance:.2f}%; trainer.teacher_floor={floor:g} asks for at least {floor * chance:.2f}%), so it would "
        "teach noise and training did not start. Likely causes: the teacher was trained on another data set, "
        "or on the same classes in another order (timm's readers order class folders naturally, 1, 2, ..., 10, "
        "while torchvision's ImageFolder and DeiT's scripts sort them as strings, 1, 10, 2, ...: give the "
        "teacher's order with data.class_map=FILE, one class folder name per line). To distil from it "
        "anyway, set trainer.teacher_floor=0.")


class Teacher(nn.Module):
    """A frozen teacher that takes batches prepared for the student.

    The batch is re-normalised with the teacher's statistics (``timm.task.DistillationTeacher``),
    grey images are repeated to an RGB teacher's three channels, RGB images are turned grey (ITU-R
    601 luma, as PIL and torchvision do) for a grey teacher, and the images are resized (with
    antialiasing) when the teacher takes another size.

    Args:
        model: the teacher, weights loaded.
        norm: the ``(mean, std)`` the teacher was trained with.
        student_input: the student's input config (``input_size``, ``mean``, ``std``).
        capture: what the distillation methods read from the teacher.
        token_grad: keep a graph from the teacher's tokens to its logits (AD-KD's attributions);
            the teacher's own parameters never get gradients.
    """

    def __init__(self, model: nn.Module, norm: Tuple[Sequence[float], Sequence[float]],
                 student_input: Dict[str, Any], capture: Capture = Capture(), token_grad: bool = False):
        super().__init__()
        model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(norm[0]), "std": tuple(norm[1])}
        self.kd = DistillationTeacher(model)
        model.requires_grad_(False)
        c_s, h_s, w_s = student_input["input_size"]
        c_t, h_t, w_t = input_size(model)
        if c_s != c_t and sorted((c_s, c_t)) != [1, 3]:
            raise UserError(f"The teacher takes {c_t}-channel images and the student {c_s}-channel "
                            "ones; a teacher can only bridge grey (1) and RGB (3) inputs. Give one "
                            "of them in_chans equal to the other's.")
        self.size = None if (h_s, w_s) == (h_t, w_t) else (h_t, w_t)
        self.register_buffer("student_mean", torch.tensor(student_input["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("student_std", torch.tensor(student_input["std"]).view(1, -1, 1, 1), persistent=False)
        self.token_grad = token_grad
        self.tap = Tap(model, capture, "teacher", token_grad=token_grad)
        self.layout = token_layout(model) if hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens") else None

    @property
    def model(self) -> nn.Module:
        return self.kd.model

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # a teacher is always in eval mode

    def adapt(self, images: Tensor) -> Tensor:
        """The student's batch ``[B, C_s, H_s, W_s]`` as the teacher expects it."""
        x = self.kd.normalize_input(images, self.student_mean, self.student_std)
        c_t = self.kd.mean_kd.shape[1]
        if x.shape[1] == 3 and c_t == 1:  # normalisation is affine, so luma commutes with it
            x = torch.einsum("bchw,c->bhw", x, x.new_tensor(LUMA))[:, None]
        elif x.shape[1] != c_t:  # grey to RGB; equal statistics skip re-normalising grey
            x = x.expand(-1, c_t, -1, -1)
        if self.size is not None:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return x

    @property
    def description(self) -> str:
        return describe(self.model)

    def outputs(self, images: Tensor, epoch: int, batch: int) -> Outputs:
        """The outputs for the ``batch``-th training batch of ``epoch`` (the position matters to a
        teacher cache, ``shd_vision.cache``, which replays them; a live teacher computes them)."""
        return self(images)

    def forward(self, images: Tensor) -> Outputs:
        """The teacher's logits ``[B, C]`` and what the methods asked to capture."""
        with torch.set_grad_enabled(self.token_grad), self.tap.recording_on():
            logits = self.kd(self.adapt(images))
        return Outputs(logits, None, self.tap.pop(), self.layout, self.model)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Logits only, nothing captured (validation of the teacher)."""
        return self.kd(self.adapt(images))
