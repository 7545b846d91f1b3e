"""Distillation methods. Every module in this package is imported here, so a method registers
itself (``@register``) by existing: a new method is one file here and one YAML in ``conf/kd/``."""

import importlib
import pkgutil

from shd_vision.distill.base import METHODS, Batch, Distiller, Method, Needs, register  # noqa: F401

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
