"""shd-vision: knowledge distillation of vision transformers, Squeezing-Heads Distillation first."""

__version__ = "0.1.0"
