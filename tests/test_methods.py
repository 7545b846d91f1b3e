"""DeiT token distillation, FitNet and AD-KD (methods.md §2, §3, §7) against independent
computations, and combinations of terms."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from shd_vision.distill.adkd import (attribution_loss, integrated_gradients, logits_from_tokens, token_attribution,
                                     token_norms)
from shd_vision.distill.base import Batch, Distiller, active_terms
from shd_vision.errors import UserError
from shd_vision.models.teacher import Teacher

F64 = torch.float64


def kd(**weights_and_settings):
    """conf/kd/combo.yaml with some terms switched on: ``shd={'weight': 1}``, ..."""
    cfg = OmegaConf.load("conf/kd/combo.yaml")
    for name, values in weights_and_settings.items():
        cfg.terms[name].update(values)
    for name in cfg.terms:
        if name not in weights_and_settings and name != "ce":
            cfg.terms[name].weight = 0.0
    return active_terms(cfg)


def vit(name="vit_tiny_patch16_224", **kw):
    args = dict(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=4)
    return timm.create_model(name, **{**args, **kw})


def run(student, teacher, terms, x=None, y=None, distiller=None):
    distiller = distiller or Distiller(student, terms, teacher)
    data = {"input_size": (3, 16, 16), "mean": (0.0,) * 3, "std": (1.0,) * 3}
    t = Teacher(teacher, ((0.0,) * 3, (1.0,) * 3), data, distiller.needs.teacher_capture,
                distiller.needs.teacher_token_grad)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) if x is None else x
    y = torch.tensor([0, 1, 3]) if y is None else y
    out = t(x)
    terms_out, logs, logits = distiller.train()(Batch(x, y, y), out)
    return distiller, terms_out, out, logits


# ---------------------------------------------------------------- DeiT
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_deit_losses_match_the_formulas(mode):
    torch.manual_seed(0)
    student = vit("deit_tiny_distilled_patch16_224", drop_rate=0.0)
    teacher = vit(embed_dim=32, depth=1).eval()
    terms = kd(deit={"weight": 0.5, "mode": mode, "temperature": 3.0}, ce={"weight": 0.5})
    distiller, out, t_out, _ = run(student, teacher, terms)
    x, y = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 3])
    cls, dist = student.train()(x)
    zt = t_out.logits
    if mode == "hard":
        l_dist = F.cross_entropy(dist, zt.argmax(-1))
    else:
        pt, log_ps = F.softmax(zt / 3, -1), F.log_softmax(dist / 3, -1)
        l_dist = 9 * (pt * (pt.log() - log_ps)).sum(-1).mean()
    torch.testing.assert_close(out["ce"], 0.5 * F.cross_entropy(cls, y))
    torch.testing.assert_close(out["deit"], 0.5 * l_dist)
    student.eval()
    torch.testing.assert_close(student(x), (cls + dist) / 2)  # inference averages both heads


def test_deit_needs_a_distilled_student():
    with pytest.raises(UserError, match="model=deit_tiny_distilled"):
        run(vit(), vit(embed_dim=32).eval(), kd(deit={"weight": 1.0}))


# ---------------------------------------------------------------- FitNet
def test_fitnet_trains_student_and_projectors_but_not_the_teacher():
    student, teacher = vit(), vit(embed_dim=32, depth=4).eval().requires_grad_(False)
    distiller, out, t_out, _ = run(student, teacher, kd(fitnet={"weight": 1.0, "layers": "uniform"}))
    fitnet = distiller.methods["fitnet"]
    assert [tuple(p) for p in fitnet.pairs] == [(0, 1), (1, 3)]
    assert [(p.in_features, p.out_features) for p in fitnet.projectors] == [(16, 32), (16, 32)]
    out["fitnet"].backward()
    assert all(p.weight.grad.abs().sum() > 0 for p in fitnet.projectors)
    assert student.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert "methods" not in student.state_dict() and any(k.startswith("fitnet.") for k in distiller.methods.state_dict())


def test_fitnet_loss_is_the_mse_of_the_projected_features():
    student, teacher = vit(depth=1), vit(embed_dim=32, depth=1).eval()
    feats = {}
    student.blocks[0].register_forward_hook(lambda m, a, o: feats.__setitem__("s", o))
    teacher.blocks[0].register_forward_hook(lambda m, a, o: feats.__setitem__("t", o))
    distiller, out, _, _ = run(student, teacher, kd(fitnet={"weight": 1.0, "layers": "last"}))
    proj = distiller.methods["fitnet"].projectors[0]
    expected = ((proj(feats["s"]) - feats["t"]) ** 2).mean()
    torch.testing.assert_close(out["fitnet"], expected)


# ---------------------------------------------------------------- AD-KD
class Quadratic(torch.nn.Module):
    """logits z = [Σ (x w)², Σ x v] for tokens x [B, N, D]: smooth, with analytic gradients."""

    def __init__(self, d):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w, self.v = torch.randn(d, dtype=F64, generator=g), torch.randn(d, dtype=F64, generator=g)

    def forward(self, x):
        return torch.stack([((x * self.w) ** 2).sum((1, 2)), (x * self.v).sum((1, 2))], -1)


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_integrated_gradients_match_a_float64_riemann_sum(steps):
    model = Quadratic(4)
    x = torch.randn(2, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([0, 1])
    ig = integrated_gradients(model, x, classes, steps)
    expected = torch.zeros_like(x)
    for k in range(1, steps + 1):
        xk = (x * k / steps).requires_grad_(True)
        f = -F.log_softmax(model(xk), -1).gather(1, classes[:, None]).sum()
        expected += torch.autograd.grad(f, xk)[0]
    torch.testing.assert_close(ig, x * expected / steps)


def test_integrated_gradients_are_complete_as_steps_grow():
    model = Quadratic(4)
    x = torch.randn(2, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(2)) * 0.3
    classes = torch.tensor([0, 1])
    f = lambda t: -F.log_softmax(model(t), -1).gather(1, classes[:, None])[:, 0]  # noqa: E731
    gap = f(x) - f(torch.zeros_like(x))
    errors = [(integrated_gradients(model, x, classes, m).sum((1, 2)) - gap).abs().max().item() for m in (4, 64, 1024)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3 * gap.abs().max().item()


def test_token_attribution_with_top_k_matches_a_loop():
    ig = torch.randn(2, 5, 6, dtype=F64, generator=torch.Generator().manual_seed(4))
    got = token_attribution(ig, top_k=2)
    for b in range(2):
        norms = [math.sqrt(sum(v * v for v in sorted(abs(t) for t in ig[b, i].tolist())[-2:])) for i in range(5)]
        total = math.sqrt(sum(n * n for n in norms))
        torch.testing.assert_close(got[b], torch.tensor([n / total for n in norms], dtype=F64))
    torch.testing.assert_close(token_norms(ig), ig.norm(dim=-1))


def test_attribution_loss_on_a_hand_derived_case():
    a_s = torch.tensor([[0.6, 0.8, 0.0], [1.0, 0.0, 0.0]])
    a_t = torch.tensor([[0.0, 1.0, 0.0], [0.6, 0.0, 0.8]])
    # squared differences: 0.36 + 0.04 + 0 + 0.16 + 0 + 0.64 = 1.2, over 3 non-zero teacher entries
    assert attribution_loss(a_s, a_t).item() == pytest.approx(0.4)


def test_adkd_backpropagates_through_the_students_gradients():
    student, teacher = vit(), vit(embed_dim=32, patch_size=4).eval().requires_grad_(False)
    terms = kd(adkd={"weight": 1.0, "views": ["gold", "topk"], "top_classes": 2, "top_k": 8})
    distiller, out, t_out, logits = run(student, teacher, terms)
    out["adkd"].backward()
    grads = {n: p.grad for n, p in student.named_parameters()}
    assert grads["head.weight"].abs().sum() > 0 and grads["patch_embed.proj.weight"].abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert t_out.record.tokens.grad is None  # the teacher's attributions are a constant target


def test_adkd_loss_matches_attributions_computed_by_hand():
    student, teacher = vit(), vit(embed_dim=32).eval().requires_grad_(False)
    x, y = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5)), torch.tensor([2, 0, 1])
    _, out, _, _ = run(student, teacher, kd(adkd={"weight": 1.0, "steps": 2}), x, y)

    def attribution(model, train, top_k=None):
        model.train(train)
        e = {}
        h = model.blocks[0].register_forward_pre_hook(lambda m, a: e.__setitem__("x", a[0]))
        model(x)
        h.remove()
        tokens = e["x"].detach().requires_grad_(True)
        ig = integrated_gradients(lambda t: logits_from_tokens(model, t), tokens, y, 2)
        return token_attribution(ig, top_k)

    torch.manual_seed(0)
    expected = attribution_loss(attribution(student, True), attribution(teacher, False))
    torch.testing.assert_close(out["adkd"], expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- combinations
def test_a_combination_is_the_weighted_sum_of_its_terms_alone():
    student = vit("deit_tiny_distilled_patch16_224")
    teacher = vit(embed_dim=32, depth=3).eval().requires_grad_(False)
    settings = {"logit": {"temperature": 2.0}, "shd": {}, "fitnet": {}, "deit": {"mode": "soft"},
                "adkd": {"views": ["gold"]}}
    weights = {"logit": 0.3, "shd": 2.0, "fitnet": 0.5, "deit": 0.7, "adkd": 1.5}
    combined, together, _, _ = run(student, teacher,
                                   kd(ce={"weight": 0.25}, **{n: {**s, "weight": weights[n]} for n, s in settings.items()}))
    assert set(together) == {"ce", *settings}
    for name, setting in settings.items():
        alone = Distiller(student, kd(**{name: {**setting, "weight": 1.0}}), teacher)
        alone.methods[name].load_state_dict(combined.methods[name].state_dict())  # FitNet's projectors
        _, terms, _, _ = run(student, teacher, None, distiller=alone)
        torch.testing.assert_close(together[name], weights[name] * terms[name], rtol=1e-5, atol=1e-7)


def test_a_new_method_needs_only_its_class_and_a_kd_entry():
    from dataclasses import dataclass

    from shd_vision.config import greater_than
    from shd_vision.distill.base import METHODS, Method, Needs, TermConfig, register

    @dataclass
    class CosineConfig(TermConfig):
        temperature: float = greater_than(0.0)

    @register("cosine_test")
    class CosineKD(Method):
        Config = CosineConfig

        def needs(self):
            return Needs()

        def forward(self, batch, student, teacher):
            return 1 - F.cosine_similarity(student.logits, teacher.logits).mean(), {}

    try:
        cfg = OmegaConf.load("conf/kd/logit.yaml")
        cfg.terms = {"cosine_test": {"weight": 2.0, "temperature": 1.0}}
        _, out, t_out, logits = run(vit(), vit(embed_dim=32).eval(), active_terms(cfg))
        torch.testing.assert_close(out["cosine_test"], 2 * (1 - F.cosine_similarity(logits, t_out.logits).mean()))
        cfg.terms.cosine_test.temperature = 0
        with pytest.raises(UserError, match="kd.terms.cosine_test.temperature=0"):
            active_terms(cfg)
    finally:
        METHODS.pop("cosine_test")


def test_every_module_in_the_package_registers_its_method():
    from shd_vision.distill.base import METHODS

    assert {"ce", "logit", "deit", "fitnet", "shd", "adkd"} <= set(METHODS)
