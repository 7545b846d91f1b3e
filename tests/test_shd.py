"""SHD (methods.md §4–§6) against independent computations: analytic merges, brute-force least
squares, float64 loops, timm's unfused attention, and gradients."""

import itertools

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from shd_vision.distill.base import Batch, Distiller, active_terms
from shd_vision.distill.mapping import align_maps, align_tokens, layer_pairs, resolve_pairs
from shd_vision.distill.shd import attention_kl, attention_kl_rows, balanced_groups, squeeze_weights, squeezed_targets
from shd_vision.errors import UserError
from shd_vision.models.taps import Capture, Tap, TokenLayout, token_layout

F64 = torch.float64


def maps(b, h, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, n, generator=g, dtype=F64) * 2).softmax(-1)


def circuits(b, h, n, d, seed=1):
    return torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def residual(a, x, w):
    """‖Σ_h A_h X_h − (Σ_h w_h A_h)(Σ_h X_h)‖² for one sample, written out."""
    y = sum(a[h] @ x[h] for h in range(len(w)))
    m = sum(w[h] * a[h] for h in range(len(w)))
    return ((y - m @ sum(x)) ** 2).sum().item()


def test_equal_circuits_merge_half_and_half():
    a, x = maps(3, 2, 6), circuits(3, 1, 6, 4).expand(-1, 2, -1, -1)
    w = squeeze_weights(a, x, 1)
    torch.testing.assert_close(w, torch.full((3, 1, 2), 0.5, dtype=F64))


def test_a_zero_circuit_gives_all_weight_to_the_other_head():
    a, x = maps(3, 2, 6), circuits(3, 2, 6, 4)
    x[:, 1] = 0
    torch.testing.assert_close(squeeze_weights(a, x, 1), torch.tensor([1.0, 0.0], dtype=F64).expand(3, 1, 2))


@pytest.mark.parametrize("seed", range(5))
def test_pair_merge_matches_a_brute_force_minimum(seed):
    a, x = maps(1, 2, 5, seed), circuits(1, 2, 5, 3, seed + 10)
    alpha = squeeze_weights(a, x, 1)[0, 0, 0].item()
    grid = torch.linspace(0, 1, 20001, dtype=F64)
    best = grid[torch.tensor([residual(a[0], x[0], (g, 1 - g)) for g in grid.tolist()], dtype=F64).argmin()].item()
    assert alpha == pytest.approx(best, abs=1e-4)


@pytest.mark.parametrize("merge", ["progressive", "group", "mean"])
@pytest.mark.parametrize("ht,hs", [(6, 3), (9, 3), (16, 6), (12, 12), (3, 6), (12, 5), (4, 1)])
def test_weights_are_convex_within_the_expected_groups(ht, hs, merge):
    w = squeeze_weights(maps(2, ht, 5), circuits(2, ht, 5, 3), hs, merge)
    assert w.shape == (2, hs, ht)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, hs, dtype=F64))
    assert (w >= 0).all()
    if hs >= ht:
        expected = [[g // (hs // ht)] for g in range(hs)]
    elif merge == "progressive":
        expected = {(6, 3): [[0, 1], [2, 3], [4, 5]], (9, 3): [[0, 1, 2, 3], [4, 5, 6, 7], [8]],
                    (16, 6): [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11], [12, 13], [14, 15]],
                    (12, 5): [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9], [10, 11]],
                    (4, 1): [[0, 1, 2, 3]]}[(ht, hs)]
    else:
        expected = balanced_groups(ht, hs)
    for g, group in enumerate(expected):
        outside = [h for h in range(ht) if h not in group]
        assert (w[:, g, outside] == 0).all(), (g, group)
    if merge == "mean" and hs < ht:
        for g, group in enumerate(expected):
            torch.testing.assert_close(w[:, g, group], torch.full((2, len(group)), 1 / len(group), dtype=F64))


def test_balanced_groups_put_larger_groups_first():
    assert balanced_groups(16, 6) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13], [14, 15]]


def test_group_weights_minimise_the_residual_over_the_simplex():
    a, x = maps(1, 3, 4, 3), circuits(1, 3, 4, 2, 4)
    w = squeeze_weights(a, x, 1, "group")[0, 0]
    steps = [i / 200 for i in range(201)]
    best = min(residual(a[0], x[0], (p, q, 1 - p - q)) for p, q in itertools.product(steps, steps) if p + q <= 1)
    assert residual(a[0], x[0], w.tolist()) <= best + 1e-9


def test_group_merging_of_pairs_equals_progressive():
    a, x = maps(4, 6, 5), circuits(4, 6, 5, 3)
    torch.testing.assert_close(squeeze_weights(a, x, 3, "group"), squeeze_weights(a, x, 3, "progressive"))


def test_more_student_heads_than_teacher_heads_must_divide():
    with pytest.raises(UserError, match="3 teacher heads to 4 student heads"):
        squeeze_weights(maps(1, 3, 4), circuits(1, 3, 4, 2), 4)


def test_attention_kl_matches_a_float64_loop():
    zs = torch.randn(2, 3, 4, 4, dtype=F64) * 2
    target = maps(2, 3, 4, 5)
    tau = 2.0
    total = 0.0
    for b, g, i in itertools.product(range(2), range(3), range(4)):
        q = (zs[b, g, i] / tau).softmax(-1)
        total += sum(p * torch.log(p / qq) for p, qq in zip(target[b, g, i], q)).item()
    assert attention_kl(zs, target, tau).item() == pytest.approx(tau ** 2 * total / 24, rel=1e-10)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_attention_kl_gradient_is_autograd_through_the_definition(tau):
    """attention_kl writes its gradient out (τ (softmax(z/τ) Σp − p)); it must equal autograd
    through τ² Σ p (log p − log_softmax(z/τ)), with exact zeros in the target (0 log 0 = 0) and
    a weight per row, as the mean over rows and a downstream weight give."""
    zs = (torch.randn(2, 3, 5, 5, dtype=F64) * 3).requires_grad_()
    target = maps(2, 3, 5, 7)
    target[0, 1, 2] = torch.tensor([0.0, 0.7, 0.0, 0.3, 0.0], dtype=F64)
    row_weights = torch.rand(2, 3, 5, dtype=F64)
    (grad,) = torch.autograd.grad((attention_kl_rows(zs, target, tau) * row_weights).sum(), zs)
    reference = tau ** 2 * (torch.xlogy(target, target) - target * F.log_softmax(zs / tau, -1)).sum(-1)
    (expected,) = torch.autograd.grad((reference * row_weights).sum(), zs)
    torch.testing.assert_close(attention_kl_rows(zs, target, tau), reference.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_attention_kl_of_bf16_scores_returns_a_bf16_gradient():
    zs = torch.randn(2, 3, 5, 5, dtype=torch.bfloat16, requires_grad=True)
    loss = attention_kl(zs, maps(2, 3, 5, 1).float(), 1.0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert zs.grad.dtype == torch.bfloat16 and torch.isfinite(zs.grad).all()


def test_layer_pairs():
    assert layer_pairs(4, 6) == [(0, 0), (1, 2), (2, 3), (3, 5)]
    assert layer_pairs(6, 12) == [(0, 1), (1, 3), (2, 5), (3, 7), (4, 9), (5, 11)]
    assert layer_pairs(5, 5) == [(i, i) for i in range(5)]
    assert layer_pairs(6, 12, "last") == [(5, 11)]
    assert resolve_pairs([[3, 5], [0, 1]], 4, 6, "k") == [(3, 5), (0, 1)]
    with pytest.raises(UserError, match=r"pair \[4, 1\] is out of range.*0..3"):
        resolve_pairs([[4, 1]], 4, 6, "kd.terms.shd.layers")


@pytest.mark.parametrize("src,dst", [((4, 4), (2, 2)), ((2, 2), (4, 4)), ((3, 3), (3, 3))])
def test_aligned_maps_stay_row_stochastic(src, dst):
    s_layout = TokenLayout(2, True, src)  # class + distillation token
    d_layout = TokenLayout(1, True, dst)
    m = maps(2, 3, s_layout.num_tokens)
    out = align_maps(m, s_layout, d_layout)
    assert out.shape == (2, 3, 1 + dst[0] * dst[1], 1 + dst[0] * dst[1])
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(out.shape[:-1], dtype=F64))


def test_alignment_drops_the_distillation_token_and_averages_patches():
    layout, student = TokenLayout(2, True, (2, 2)), TokenLayout(1, True, (1, 1))
    x = torch.arange(6.0).view(1, 6, 1)  # cls, dist, 4 patches
    torch.testing.assert_close(align_tokens(x, layout, student).flatten(), torch.tensor([0.0, 3.5]))


def vit(name="vit_tiny_patch16_224", **kw):
    args = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=5)
    return timm.create_model(name, **{**args, **kw}).double().eval()


@pytest.mark.parametrize("kind", ["vit", "distilled", "qk_norm"])
def test_captured_maps_equal_timms_unfused_attention(kind):
    model = {"vit": lambda: vit(), "distilled": lambda: vit("deit_tiny_distilled_patch16_224"),
             "qk_norm": lambda: vit(qk_norm=True)}[kind]()
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.qkv.weight, std=0.3)
    tap = Tap(model, Capture(attention=frozenset({0, 1})), "student")
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    with tap.recording_on():
        model(x)
    captured = tap.pop().attention
    reference = {}
    for i, block in enumerate(model.blocks):
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_pre_hook(lambda m, a, i=i: reference.__setitem__(i, a[0]))
    model(x)
    for i in (0, 1):
        torch.testing.assert_close(captured[i].scores().softmax(-1), reference[i])


def test_unrequested_blocks_and_the_forward_keep_fused_attention(monkeypatch):
    model = vit(depth=3).float()
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    tap = Tap(model, Capture(attention=frozenset({1})), "student")
    with tap.recording_on():
        model(torch.randn(1, 3, 32, 32))
    assert len(calls) == 3 and set(tap.pop().attention) == {1}


def shd_terms(**shd):
    kd = OmegaConf.load("conf/kd/combo.yaml")
    kd.terms.shd.weight = 1.0
    kd.terms.shd.update(shd)
    return active_terms(kd)


def step(student, teacher, terms, size=32):
    from shd_vision.models.teacher import Teacher

    distiller = Distiller(student, terms, teacher)
    student_input = {"input_size": (3, size, size), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    t = Teacher(teacher, ((0.5,) * 3, (0.5,) * 3), student_input, distiller.needs.teacher_capture)
    x, y = torch.randn(2, 3, size, size), torch.tensor([1, 2])
    terms_out, logs, _ = distiller.train()(Batch(x, y, y), t(x))
    return distiller, terms_out, logs


PAIRS = {
    "deit_s_to_ti": (dict(model_name="deit_small_patch16_224"), dict(model_name="deit_tiny_patch16_224")),
    "deit_b_to_s": (dict(model_name="deit_base_patch16_224"), dict(model_name="deit_small_patch16_224")),
    "12_to_6_layers": (dict(model_name="deit_tiny_patch16_224"), dict(model_name="deit_tiny_patch16_224", depth=6)),
    "to_distilled_student": (dict(model_name="deit_small_patch16_224"), dict(model_name="deit_tiny_distilled_patch16_224")),
    "other_patch_size": (dict(model_name="deit_small_patch16_224", patch_size=8), dict(model_name="deit_tiny_patch16_224")),
}


@pytest.mark.parametrize("pair", PAIRS)
def test_shd_runs_on_deit_pairs_and_only_the_student_learns(pair):
    t_spec, s_spec = PAIRS[pair]
    teacher = timm.create_model(**{"img_size": 32, "num_classes": 5, **t_spec}).eval().requires_grad_(False)
    student = timm.create_model(**{"img_size": 32, "num_classes": 5, **s_spec})
    distiller, terms, logs = step(student, teacher, shd_terms())
    pairs = layer_pairs(len(student.blocks), len(teacher.blocks))
    assert {f"shd/layer{s}" for s, _ in pairs} <= set(logs)
    terms["shd"].backward()
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    ratio = teacher.blocks[0].attn.num_heads / student.blocks[0].attn.num_heads
    assert 1 <= logs["shd/w_eff"].item() <= ratio + 1e-5


@pytest.mark.parametrize("merge", ["progressive", "group", "select"])
@pytest.mark.parametrize("hs", [3, 1])  # select: groups of 2 stay factored, the group of 6 is multiplied out
def test_factored_squeeze_equals_the_public_function_on_full_circuits(merge, hs):
    teacher = timm.create_model("deit_small_patch16_224", img_size=32, num_classes=5).double().eval()
    tap = Tap(teacher, Capture(attention=frozenset({3})), "teacher")
    with tap.recording_on(), torch.no_grad():
        teacher(torch.randn(3, 3, 32, 32, dtype=F64))
    rec = tap.pop().attention[3]
    layout = token_layout(teacher)
    target, w = squeezed_targets(rec, hs, merge, 1.0, layout, layout)
    full = squeeze_weights(rec.scores().softmax(-1), rec.circuits(), hs, merge)
    torch.testing.assert_close(w, full)
    torch.testing.assert_close(target, torch.einsum("bgh,bhqk->bgqk", full, rec.scores().softmax(-1)))


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_softened_targets_are_the_softmax_of_the_scores_over_tau(tau):
    """squeezed_targets softens the maps as p^(1/τ) / Σ p^(1/τ); the definition is
    Σ_h W[g, h] softmax(Z_h / τ) on the raw scores."""
    teacher = timm.create_model("deit_small_patch16_224", img_size=32, num_classes=5).double().eval()
    tap = Tap(teacher, Capture(attention=frozenset({2})), "teacher")
    with tap.recording_on(), torch.no_grad():
        teacher(torch.randn(2, 3, 32, 32, dtype=F64) * 3)
    rec = tap.pop().attention[2]
    layout = token_layout(teacher)
    target, w = squeezed_targets(rec, 2, "group", tau, layout, layout)
    expected = torch.einsum("bgh,bhqk->bgqk", w, (rec.scores() / tau).softmax(-1))
    torch.testing.assert_close(target, expected, rtol=1e-10, atol=1e-12)


def test_a_cnn_teacher_is_a_one_paragraph_error():
    teacher = timm.create_model("resnet10t", num_classes=5)
    with pytest.raises(UserError, match="no ViT-style global attention"):
        step(vit().float(), teacher, shd_terms())


@pytest.mark.parametrize("stack", [True, False])
@pytest.mark.parametrize("merge,temperature", [("progressive", 1.0), ("group", 2.0), ("mean", 0.5)])
def test_stacked_block_pairs_equal_a_loop_over_pairs(merge, temperature, stack):
    """SHD runs every block pair of one shape as one batch (on GPUs) or pair by pair (on CPUs);
    the loss, its gradient and every log must equal the pair-by-pair computation with the public
    functions."""
    teacher = timm.create_model("deit_small_patch16_224", img_size=32, num_classes=5).double().eval()
    student = timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=5, depth=4).double()
    terms = shd_terms(merge=merge, temperature=temperature)
    distiller = Distiller(student, terms, teacher)
    student_tap = Tap(student, distiller.needs.student, "student")
    teacher_tap = Tap(teacher, distiller.needs.teacher_capture, "teacher")
    x = torch.randn(3, 3, 32, 32, dtype=F64)
    with student_tap.recording_on():
        student(x)
    with teacher_tap.recording_on(), torch.no_grad():
        teacher(x)
    s_rec, t_rec = student_tap.pop().attention, teacher_tap.pop().attention
    layout_s, layout_t = token_layout(student), token_layout(teacher)
    losses, logs = [], {}
    for s, t in layer_pairs(4, 12):
        target, w = squeezed_targets(t_rec[t], 3, merge, temperature, layout_t, layout_s)
        loss = attention_kl(s_rec[s].scores(), target, temperature)
        losses.append(loss)
        logs[f"layer{s}"] = loss.detach()
    reference = torch.stack(losses).mean()
    (ref_grad,) = torch.autograd.grad(reference, student.blocks[1].attn.qkv.weight, retain_graph=True)

    class Out:  # the two Outputs the term reads
        def __init__(self, rec):
            self.record = type("R", (), {"attention": rec})()

    distiller.methods["shd"].stack_pairs = stack
    loss, term_logs = distiller.methods["shd"](None, Out(s_rec), Out(t_rec))
    torch.testing.assert_close(loss, reference)
    (grad,) = torch.autograd.grad(loss, student.blocks[1].attn.qkv.weight)
    torch.testing.assert_close(grad, ref_grad)
    for k, v in logs.items():
        torch.testing.assert_close(term_logs[k], v)
