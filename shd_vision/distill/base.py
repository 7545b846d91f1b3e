"""The method registry and the module that turns a batch into named, weighted loss terms.

A distillation method is one :class:`Method` subclass registered with :func:`register`, plus its
config dataclass. ``kd.terms`` in the config lists methods with weights; the :class:`Distiller`
builds the ones with a non-zero weight, asks each what it needs from the two forwards
(:class:`Needs`), runs the student, and returns ``{name: weight * loss}`` for the loop to sum.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Type

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from shd_vision.config import at_least, check_config
from shd_vision.errors import UserError
from shd_vision.models.taps import Capture, Outputs, Tap, token_layout

METHODS: Dict[str, Type["Method"]] = {}


def upcast(t: Tensor) -> Tensor:
    """``t`` in float32 or wider: losses are summed in full precision under autocast (bf16/fp16)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


@dataclass
class TermConfig:
    """Every term has a weight; a weight of 0 leaves the term out of the run."""

    weight: float = at_least(0.0)


@dataclass(frozen=True)
class Needs:
    """What a method reads from the forwards of one step."""

    dist_token: bool = False  # a distilled student returns (class, distillation) logits
    student: Capture = field(default_factory=Capture)
    teacher_capture: Capture = field(default_factory=Capture)
    teacher_token_grad: bool = False  # graph from the teacher's tokens to its logits
    second_order: bool = False  # the loss differentiates the student's own gradients

    def __or__(self, other: "Needs") -> "Needs":
        return Needs(self.dist_token or other.dist_token,
                     self.student | other.student, self.teacher_capture | other.teacher_capture,
                     self.teacher_token_grad or other.teacher_token_grad,
                     self.second_order or other.second_order)


@dataclass
class Batch:
    images: Tensor  # [B, C, H, W], normalised for the student
    targets: Tensor  # [B] class indices, or [B, C] probabilities (mixup, label smoothing)
    labels: Tensor  # [B] class indices (the largest target under mixup)


class Method(nn.Module, abc.ABC):
    """One loss term. Subclasses set ``Config`` and implement ``needs`` and ``forward``.

    Args:
        cfg: the term's config (a ``Config`` instance checked against its schema).
        student: the student model.
        teacher: the teacher model, or None when no active method uses one.
    """

    name: ClassVar[str]
    Config: ClassVar[type] = TermConfig
    uses_teacher: ClassVar[bool] = True
    teacher_logits_only: ClassVar[bool] = False  # reads nothing of the teacher but its logits (a cache serves it)

    def __init__(self, cfg: Any, student: nn.Module, teacher: Optional[nn.Module]):
        super().__init__()
        self.cfg = cfg

    @abc.abstractmethod
    def needs(self) -> Needs:
        """What this method reads from the student's and the teacher's forwards."""

    @abc.abstractmethod
    def forward(self, batch: Batch, student: Outputs, teacher: Optional[Outputs]
                ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Returns the unweighted loss (a scalar) and diagnostics to log (scalars)."""


def register(name: str) -> Callable[[Type[Method]], Type[Method]]:
    """Class decorator adding a method to the registry under ``name`` (its ``kd.terms`` key)."""
    def add(cls: Type[Method]) -> Type[Method]:
        if name in METHODS:
            raise ValueError(f"two distillation methods are registered as '{name}'")
        cls.name = name
        METHODS[name] = cls
        return cls
    return add


def term_config(name: str, node: Any) -> Any:
    """Check one ``kd.terms.<name>`` entry against its method's schema."""
    if name not in METHODS:
        raise UserError(f"kd.terms.{name}: there is no distillation method '{name}'; registered "
                        f"methods: {', '.join(sorted(METHODS))}.")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(METHODS[name].Config), node)
        OmegaConf.to_container(cfg, throw_on_missing=True)
    except OmegaConfBaseException as e:
        valid = ", ".join(f.name for f in METHODS[name].Config.__dataclass_fields__.values())
        raise UserError(f"kd.terms.{name} is invalid ({str(e).splitlines()[0]}); its keys are: "
                        f"{valid}.") from None
    check_config(cfg, f"kd.terms.{name}.")
    return cfg


def uses_teacher(terms: Dict[str, Any]) -> bool:
    return any(METHODS[name].uses_teacher for name in terms)


def active_terms(kd: DictConfig) -> Dict[str, Any]:
    """The checked configs of the terms with a non-zero weight, in config order."""
    terms = {name: term_config(name, node) for name, node in kd.terms.items()}
    active = {name: cfg for name, cfg in terms.items() if cfg.weight > 0}
    if not active:
        raise UserError(f"kd={kd.name} has no term with a weight above 0; give at least one "
                        f"kd.terms.<name>.weight a positive value.")
    return active


class Distiller(nn.Module):
    """The trainable side of a step: the student and the methods (with any parameters of their own).

    ``forward`` runs the student on the batch, lets every method compute its loss from the
    student's and the teacher's outputs, and returns the weighted terms. Wrapping this module
    in DDP synchronises the student and the methods' parameters (FitNet's projectors) alike;
    the teacher stays outside.
    """

    def __init__(self, student: nn.Module, terms: Dict[str, Any], teacher: Optional[nn.Module] = None):
        super().__init__()
        self.student = student
        self.weights = {name: float(cfg.weight) for name, cfg in terms.items()}
        self.methods = nn.ModuleDict({name: METHODS[name](cfg, student, teacher)
                                      for name, cfg in terms.items()})
        self.needs = Needs()
        for method in self.methods.values():
            self.needs = self.needs | method.needs()
        if self.needs.dist_token:
            student.set_distilled_training(True)
        self.tap = Tap(student, self.needs.student, "student")
        self.layout = token_layout(student) if self.needs.student != Capture() else None

    def forward(self, batch: Batch, teacher: Optional[Outputs]
                ) -> Tuple[Dict[str, Tensor], Dict[str, Tensor], Tensor]:
        """Returns ``(terms, logs, logits)``: weighted loss terms, diagnostics, student logits."""
        # Fused attention kernels have no double backward; their composite (math) form has.
        with sdpa_kernel(SDPBackend.MATH) if self.needs.second_order else contextlib.nullcontext():
            return self._forward(batch, teacher)

    def _forward(self, batch: Batch, teacher: Optional[Outputs]
                 ) -> Tuple[Dict[str, Tensor], Dict[str, Tensor], Tensor]:
        with self.tap.recording_on():
            out = self.student(batch.images)
        logits, dist_logits = out if isinstance(out, tuple) else (out, None)
        student = Outputs(logits, dist_logits, self.tap.pop(), self.layout, self.student)
        terms, logs = {}, {}
        for name, method in self.methods.items():
            loss, extra = method(batch, student, teacher)
            terms[name] = self.weights[name] * loss
            logs.update({f"{name}/{k}": v for k, v in extra.items()})
        return terms, logs, logits

    def unreached_parameters(self, teacher: Optional[Callable[[Tensor], Outputs]], input_size: Sequence[int],
                             num_classes: int, device: torch.device) -> List[str]:
        """Names of the trainable parameters that no active term's gradient reaches (e.g. the
        classifier when only attention terms have weight), from one backward pass on a random
        batch of two. DDP needs them known before its first step; random states and buffers
        (BatchNorm statistics) are left as they were, so the run itself is unchanged."""
        buffers = {k: v.clone() for k, v in self.named_buffers()}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            images = torch.randn(2, *input_size, device=device)
            labels = torch.arange(2, device=device) % num_classes
            terms, _, _ = self(Batch(images, labels, labels), teacher(images) if teacher is not None else None)
            sum(terms.values()).backward()
        unreached = [n for n, p in self.named_parameters() if p.requires_grad and p.grad is None]
        self.zero_grad(set_to_none=True)
        with torch.no_grad():
            for k, v in self.named_buffers():
                v.copy_(buffers[k])
        return unreached
