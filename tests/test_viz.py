"""Attention pictures from the command line, and the head-similarity statistic."""

import torch

from conftest import debug_args, paragraph, run_cli
from shd_vision.viz.attention import head_similarity


def test_head_similarity_of_identical_and_disjoint_heads():
    a = torch.zeros(1, 3, 4, 4)
    a[0, 0, :, 0] = 1  # every query attends to key 0
    a[0, 1, :, 0] = 1  # the same map
    a[0, 2, :, 3] = 1  # a disjoint one
    sim = head_similarity(a)
    torch.testing.assert_close(sim, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))


def test_viz_writes_every_picture_for_an_shd_checkpoint(tmp_path, teacher_ckpt):
    train = run_cli("train.py", *debug_args(tmp_path, "kd=shd", f"teacher.checkpoint={teacher_ckpt}"))
    assert train.returncode == 0, train.stderr[-2000:]
    out = tmp_path / "viz"
    result = run_cli("-m shd_vision.viz", f"ckpt={tmp_path}/run/checkpoints/last.pt", "images=1", "batch=8",
                     f"hydra.run.dir={out}", "merge=select", "layers=[[3,5]]")
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("squeeze_weights", "head_redundancy", "attention_image0", "attention_full_image0"):
        assert (out / f"{name}.png").stat().st_size > 10_000


def test_viz_of_a_run_without_teacher_is_a_user_error(tmp_path):
    assert run_cli("train.py", *debug_args(tmp_path, "kd=none", "~teacher")).returncode == 0
    result = run_cli("-m shd_vision.viz", f"ckpt={tmp_path}/run/checkpoints/last.pt", f"hydra.run.dir={tmp_path}/v")
    assert result.returncode == 2 and "trained without a teacher" in paragraph(result.stderr)


def _attention_by_hand(model, block, x):
    """A block's maps ``softmax(q kᵀ / √d)`` ``[B, H, N, N]`` and circuits ``V_h W_O,hᵀ``
    ``[B, H, N, D]``, from its qkv projection's output (a hook of this test's own)."""
    seen = {}
    attn = model.blocks[block].attn
    handle = attn.qkv.register_forward_hook(lambda m, a, out: seen.update(out=out))
    model(x)
    handle.remove()
    b, n, _ = seen["out"].shape
    h = attn.num_heads
    q, k, v = seen["out"].reshape(b, n, 3, h, -1).permute(2, 0, 3, 1, 4)
    maps = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1)
    w_o = attn.proj.weight.reshape(-1, h, q.shape[-1])
    return maps, torch.einsum("bhnk,dhk->bhnd", v, w_o)


def test_the_pictures_show_each_images_own_maps_and_every_pairs_weights():
    """collect on a batch against each image alone, by hand: the shown pairs' teacher, squeezed
    and student maps of the first images (every picture of an image is drawn from these), the
    squeeze weights of every pair on every image, and one head-similarity panel per teacher
    block (12 student blocks on 6 teacher blocks drew each teacher block twice)."""
    import timm

    from shd_vision.distill.mapping import align_maps, select_tokens
    from shd_vision.distill.shd import soften, squeeze_weights
    from shd_vision.models.taps import Capture, token_layout
    from shd_vision.models.teacher import Teacher
    from shd_vision.viz.attention import collect

    torch.manual_seed(0)
    vit = dict(img_size=16, num_classes=4)
    student = timm.create_model("vit_tiny_patch16_224", patch_size=4, embed_dim=24, depth=4, num_heads=2, **vit).eval()
    t_model = timm.create_model("vit_tiny_patch16_224", patch_size=2, embed_dim=48, depth=2, num_heads=6, **vit).eval()
    with torch.no_grad():  # peaked maps, unlike a fresh model's near-uniform ones, tell images apart
        for block in t_model.blocks:
            block.attn.qkv.weight.mul_(8)
    data = {"input_size": (3, 16, 16), "mean": (0.0,) * 3, "std": (1.0,) * 3}
    teacher = Teacher(t_model, (data["mean"], data["std"]), data, Capture(attention=frozenset({0, 1})))
    s_layout, t_layout = token_layout(student), token_layout(t_model)
    pairs, tau, x = [(0, 0), (1, 0), (2, 1), (3, 1)], 2.0, torch.randn(5, 3, 16, 16)

    stats, shown = collect(student, teacher, x, pairs, [(0, 0), (3, 1)], 2, tau, "progressive")

    assert list(stats.weights) == pairs and sorted(stats.similarity) == [0, 1]
    close = dict(atol=1e-5, rtol=1e-4)
    assert not torch.allclose(stats.similarity[0], stats.similarity[1], **close)
    for t in (0, 1):
        maps = _attention_by_hand(t_model, t, x)[0]
        flat = torch.nn.functional.normalize(maps.flatten(2), dim=-1)
        torch.testing.assert_close(stats.similarity[t], (flat @ flat.transpose(1, 2)).mean(0), **close)
        assert not torch.allclose(stats.similarity[t], (flat[:2] @ flat[:2].transpose(1, 2)).mean(0), **close)
    for (s, t), weights in stats.weights.items():
        assert weights.shape == (5, 2, 6)
        for i in range(5):
            maps, circuits = _attention_by_hand(t_model, t, x[i:i + 1])
            torch.testing.assert_close(weights[i], squeeze_weights(maps, circuits, 2)[0], **close)
    assert [(lm.student_block, lm.teacher_block) for lm in shown] == [(0, 0), (3, 1)]
    for lm in shown:
        assert lm.student.shape[0] == lm.squeezed.shape[0] == lm.teacher.shape[0] == 2
        for i in range(2):
            t_maps, _ = _attention_by_hand(t_model, lm.teacher_block, x[i:i + 1])
            soft = soften(t_maps, tau)
            squeezed = torch.einsum("gh,bhqk->bgqk", lm.weights[i], soft)
            torch.testing.assert_close(lm.squeezed[i], align_maps(squeezed, t_layout, s_layout)[0], **close)
            torch.testing.assert_close(lm.teacher[i], align_maps(soft, t_layout, s_layout)[0], **close)
            torch.testing.assert_close(lm.weights[i], stats.weights[(lm.student_block, lm.teacher_block)][i], **close)
            s_maps, _ = _attention_by_hand(student, lm.student_block, x[i:i + 1])
            s_scores = s_maps.log()  # the scores up to a per-row constant, which the softmax drops
            expected = (select_tokens(s_scores, s_layout, t_layout, (-2, -1)) / tau).softmax(-1)
            torch.testing.assert_close(lm.student[i], expected[0], **close)
