"""MiniLMv2 attention relations and manifold distillation (methods.md §8, §9), and SHD's ablations
(§4: hard selection, MSE) against float64 loops, hand-derived cases and brute force."""

import itertools
import math

import pytest
import timm
import torch
from omegaconf import OmegaConf

from shd_vision.distill.base import Batch, Distiller, active_terms
from shd_vision.distill.manifold import manifold_relations, random_relation
from shd_vision.distill.minilm import relation_kl
from shd_vision.distill.shd import attention_mse, balanced_groups, squeeze_weights
from shd_vision.errors import UserError
from shd_vision.models.teacher import Teacher

F64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def terms(name, **settings):
    cfg = OmegaConf.load("conf/kd/combo.yaml")
    for other in cfg.terms:
        cfg.terms[other].weight = 0.0
    cfg.terms[name].update({"weight": 1.0, **settings})
    return active_terms(cfg)


def vit(name="vit_tiny_patch16_224", **kw):
    args = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=4)
    return timm.create_model(name, **{**args, **kw}).double()


def run(student, teacher, cfg, x):
    distiller = Distiller(student, cfg, teacher)
    data = {"input_size": (3, 16, 16), "mean": (0.0,) * 3, "std": (1.0,) * 3}
    t = Teacher(teacher, ((0.0,) * 3, (1.0,) * 3), data, distiller.needs.teacher_capture)
    y = torch.arange(len(x)) % 4
    out, logs, _ = distiller.train()(Batch(x, y, y), t(x))
    return out, logs


def qkv_of(model, block, x):
    """A block's qkv projection output, read with a hook of this test's own."""
    seen = {}
    handle = model.blocks[block].attn.qkv.register_forward_hook(lambda m, a, out: seen.update(out=out))
    model(x)
    handle.remove()
    return seen["out"]


# ---------------------------------------------------------------- MiniLMv2
def test_relation_kl_matches_a_float64_loop():
    b, n, a_r = 2, 5, 3
    xs, xt = rand(b, n, 6), rand(b, n, 12, seed=1) * 2
    total = 0.0
    for i, a in itertools.product(range(b), range(a_r)):
        s, t = xs[i, :, 2 * a:2 * a + 2], xt[i, :, 4 * a:4 * a + 4]
        for row in range(n):
            r_s = torch.softmax(torch.stack([s[row] @ s[k] / math.sqrt(2) for k in range(n)]), 0)
            r_t = torch.softmax(torch.stack([t[row] @ t[k] / math.sqrt(4) for k in range(n)]), 0)
            total += sum(p * math.log(p / q) for p, q in zip(r_t.tolist(), r_s.tolist()))
    assert relation_kl(xs, xt, a_r).item() == pytest.approx(total / (b * a_r * n), rel=1e-10)


def test_relation_kl_is_zero_for_the_same_relations_at_any_width():
    x = rand(2, 5, 8)
    # zero-padding every relation head keeps its dot products: the teacher is twice as wide
    padded = torch.cat([x.reshape(2, 5, 4, 2), torch.zeros(2, 5, 4, 2, dtype=F64)], -1).reshape(2, 5, 16)
    # scaled by √2 so that the √d_r of the wider heads gives the same relations
    assert relation_kl(x, padded * 2 ** 0.25, 4).item() == pytest.approx(0.0, abs=1e-12)


def test_relation_heads_must_divide_both_widths():
    with pytest.raises(UserError, match=r"relation_heads=5 .* student's 6 and the teacher's 12; valid values: 1, 2, 3, 6\."):
        relation_kl(rand(1, 3, 6), rand(1, 3, 12), 5)
    with pytest.raises(UserError, match="relation_heads=5"):
        Distiller(vit(), terms("minilm", relation_heads=5), vit(embed_dim=48).eval())
    with pytest.raises(UserError, match=r"relations=\['qq', 'xx'\]"):
        Distiller(vit(), terms("minilm", relations=["qq", "xx"], relation_heads=4), vit(embed_dim=48).eval())


@pytest.mark.parametrize("relations", [["qq", "kk", "vv"], ["vv"]])
def test_minilm_term_sums_relations_of_the_qkv_projections(relations):
    """The term equals relation_kl on the queries, keys and values read with a separate hook,
    from the teacher's last block into the student's; only the student gets gradients."""
    student, teacher = vit(), vit(embed_dim=48, depth=3, num_heads=6).eval().requires_grad_(False)
    x = rand(3, 3, 16, 16, seed=2)
    out, logs = run(student, teacher, terms("minilm", relation_heads=4, relations=relations), x)
    qs, qt = qkv_of(student, 1, x), qkv_of(teacher, 2, x)
    which = {"qq": 0, "kk": 1, "vv": 2}
    expected = sum(relation_kl(qs[..., 24 * which[r]:24 * (which[r] + 1)], qt[..., 48 * which[r]:48 * (which[r] + 1)], 4)
                   for r in relations)
    torch.testing.assert_close(out["minilm"], expected)
    assert {f"minilm/layer1_{r}" for r in relations} == set(logs)
    out["minilm"].backward()
    assert student.blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_minilm_drops_the_distillation_token_and_resamples_the_grid():
    """A distilled student (class + distillation token, 2x2 grid) against a teacher with a 4x4
    grid: the student's relations lose the distillation token, the teacher's are area-averaged
    over each student patch's 2x2 cells (rows and keys), then rows renormalised."""
    torch.manual_seed(0)
    student = vit("deit_tiny_distilled_patch16_224", patch_size=8)
    teacher = vit(embed_dim=48).eval()
    with torch.no_grad():
        teacher.blocks[1].attn.qkv.weight.mul_(8)  # sharp relations, far from uniform
    x = rand(2, 3, 16, 16, seed=3)
    out, _ = run(student, teacher, terms("minilm", relation_heads=4, relations=["qq"]), x)
    q_t = qkv_of(teacher, 1, x)[..., :48].reshape(2, 17, 4, 12).transpose(1, 2)
    r_t = torch.softmax(q_t @ q_t.transpose(-2, -1) / math.sqrt(12), -1)  # [2, 4, 17, 17]
    cells = [[0]] + [[1 + 4 * r + c for r in (2 * pr, 2 * pr + 1) for c in (2 * pc, 2 * pc + 1)]
                     for pr in range(2) for pc in range(2)]
    down = torch.zeros(2, 4, 5, 5, dtype=F64)
    for i, j in itertools.product(range(5), range(5)):
        down[:, :, i, j] = r_t[:, :, cells[i]][:, :, :, cells[j]].mean((-2, -1))
    down = down / down.sum(-1, keepdim=True)
    q_s = qkv_of(student, 1, x)[..., :24]
    q_s = torch.cat([q_s[:, :1], q_s[:, 2:]], 1).reshape(2, 5, 4, 6).transpose(1, 2)
    log_r_s = torch.log_softmax(q_s @ q_s.transpose(-2, -1) / math.sqrt(6), -1)
    expected = (down * (down.log() - log_r_s)).sum(-1).mean()
    assert expected > 1e-3
    torch.testing.assert_close(out["minilm"], expected)


# ---------------------------------------------------------------- manifold
def test_manifold_relations_match_float64_loops():
    b, n = 3, 4
    fs, ft = rand(b, n, 5), rand(b, n, 7, seed=1)
    ns = [[fs[i, j] / fs[i, j].norm() for j in range(n)] for i in range(b)]
    nt = [[ft[i, j] / ft[i, j].norm() for j in range(n)] for i in range(b)]
    intra = sum(((ns[i][j] @ ns[i][k]) - (nt[i][j] @ nt[i][k])) ** 2
                for i in range(b) for j in range(n) for k in range(n)) / (b * n * n)
    inter = sum(((ns[i][j] @ ns[m][j]) - (nt[i][j] @ nt[m][j])) ** 2
                for j in range(n) for i in range(b) for m in range(b)) / (n * b * b)
    got = manifold_relations(fs, ft)
    assert got[0].item() == pytest.approx(intra.item(), rel=1e-10)
    assert got[1].item() == pytest.approx(inter.item(), rel=1e-10)
    index = torch.tensor([7, 0, 11, 3])
    flat_s, flat_t = [ns[i][j] for i in range(b) for j in range(n)], [nt[i][j] for i in range(b) for j in range(n)]
    by_hand = sum(((flat_s[p] @ flat_s[q]) - (flat_t[p] @ flat_t[q])) ** 2 for p in index for q in index) / 16
    assert random_relation(fs, ft, index).item() == pytest.approx(by_hand.item(), rel=1e-10)


def test_manifold_relations_ignore_width_and_scale():
    f = rand(2, 4, 6)
    teacher = torch.cat([f, torch.zeros(2, 4, 10, dtype=F64)], -1) * 3.0  # wider, longer: same relations
    intra, inter = manifold_relations(f, teacher)
    assert intra.item() == pytest.approx(0.0, abs=1e-14) and inter.item() == pytest.approx(0.0, abs=1e-14)


def test_manifold_term_weights_its_relations_on_patch_tokens_with_the_training_rng():
    student = vit("deit_tiny_distilled_patch16_224", depth=2)
    teacher = vit(embed_dim=48, depth=4).eval().requires_grad_(False)
    x = rand(3, 3, 16, 16, seed=4)
    torch.manual_seed(5)
    out, logs = run(student, teacher, terms("manifold", samples=10), x)
    torch.manual_seed(5)
    feats = {}
    hooks = [student.blocks[i].register_forward_hook(lambda m, a, o, i=i: feats.update({("s", i): o})) for i in (0, 1)]
    hooks += [teacher.blocks[i].register_forward_hook(lambda m, a, o, i=i: feats.update({("t", i): o})) for i in (1, 3)]
    student(x), teacher(x)
    expected = 0.0
    for s, t in [(0, 1), (1, 3)]:  # uniform pairs of 2 student and 4 teacher blocks
        f_s, f_t = feats[("s", s)][:, 2:], feats[("t", t)][:, 1:]  # patch tokens only
        intra, inter = manifold_relations(f_s, f_t)
        index = torch.randperm(3 * 16)[:10]
        expected = expected + 4 * intra + 0.1 * inter + 0.2 * random_relation(f_s, f_t, index)
    torch.testing.assert_close(out["manifold"], expected / 2)
    assert {"manifold/layer0_intra", "manifold/layer1_rand"} <= set(logs)
    out["manifold"].backward()
    assert student.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


# ---------------------------------------------------------------- SHD ablations
def residual(a, x, group, h):
    y = sum(a[j] @ x[j] for j in group)
    return ((y - a[h] @ sum(x[j] for j in group)) ** 2).sum().item()


@pytest.mark.parametrize("ht,hs", [(6, 3), (7, 3), (4, 1)])
def test_select_takes_the_head_that_best_explains_its_group(ht, hs):
    a = (rand(4, ht, 5, 5) * 2).softmax(-1)
    x = rand(4, ht, 5, 3, seed=1)
    w = squeeze_weights(a, x, hs, "select")
    for b, (g, group) in itertools.product(range(4), enumerate(balanced_groups(ht, hs))):
        best = min(group, key=lambda h: residual(a[b], x[b], group, h))
        expected = torch.zeros(ht, dtype=F64)
        expected[best] = 1
        torch.testing.assert_close(w[b, g], expected)


def test_select_breaks_ties_at_the_lowest_index():
    a = (rand(1, 1, 4, 4) * 2).softmax(-1).expand(2, 4, 4, 4).contiguous()  # four identical heads
    w = squeeze_weights(a, rand(2, 4, 4, 2, seed=1), 2, "select")
    assert (w[:, 0, 0] == 1).all() and (w[:, 1, 2] == 1).all() and w.sum() == 4


def test_select_and_mse_train_through_the_config():
    student, teacher = vit(), vit(embed_dim=48, depth=3, num_heads=6).eval().requires_grad_(False)
    x = rand(2, 3, 16, 16, seed=6)
    kl, _ = run(student, teacher, terms("shd", merge="select"), x)
    mse, _ = run(student, teacher, terms("shd", merge="select", loss="mse", temperature=2.0), x)
    assert kl["shd"] > 0 and mse["shd"] > 0 and not torch.isclose(kl["shd"], mse["shd"])
    mse["shd"].backward()
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_attention_mse_on_a_hand_derived_case():
    # uniform student scores against a one-hot target over 2 keys: (0.5 − 1)² and (0.5 − 0)²
    scores = torch.zeros(1, 1, 1, 2, dtype=F64)
    target = torch.tensor([[[[1.0, 0.0]]]], dtype=F64)
    torch.testing.assert_close(attention_mse(scores, target, 3.0).mean(), torch.tensor(0.25, dtype=F64))
