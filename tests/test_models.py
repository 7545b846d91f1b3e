"""Students and teachers from timm: names, weight files in every format, class counts, and the
teacher's view of the student's batch."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from shd_vision.errors import UserError
from shd_vision.models.factory import build, check_model_name, create_teacher, load_weights
from shd_vision.models.teacher import Teacher

TINY = {"name": "vit_tiny_patch16_224", "img_size": 28, "patch_size": 4, "in_chans": 1,
        "embed_dim": 24, "depth": 2, "num_heads": 2}


def test_unknown_model_names_suggest_close_ones():
    with pytest.raises(UserError, match="deit_tiny_patch16_224"):
        check_model_name("deit_tiny_patch16_244", "model.name")


def test_extra_keys_reach_timm_and_bad_ones_are_named():
    model = build({**TINY, "drop_path_rate": 0.2}, 7, "model")
    assert model.num_classes == 7 and model.blocks[1].drop_path1.drop_prob == pytest.approx(0.2)
    with pytest.raises(UserError, match="colour=3"):
        build({**TINY, "colour": 3}, 7, "model")


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "safetensors", "ema"])
def test_teacher_loads_every_weight_file_layout(tmp_path, layout):
    source = build(TINY, 10, "teacher")
    sd = source.state_dict()
    path = tmp_path / ("t.safetensors" if layout == "safetensors" else "t.pth")
    if layout == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3}, "model": {"model": sd},
               "ema": {"model": {k: v * 0 for k, v in sd.items()}, "model_ema": sd}}[layout]
        torch.save(obj, path)
    teacher, norm, _ = create_teacher({**TINY, "checkpoint": str(path), "use_ema": layout == "ema"}, 10, False)
    assert all(torch.equal(a, b) for a, b in zip(sd.values(), teacher.state_dict().values()))
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert norm == ((0.5,), (0.5,))  # timm's config for this ViT (no shd-vision metadata in the file)


def test_teacher_checkpoint_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        create_teacher({**TINY, "checkpoint": str(tmp_path / "missing.pt")}, 10, False)
    with pytest.raises(UserError, match=f"teacher.checkpoint={tmp_path} is a folder without model.safetensors"):
        create_teacher({**TINY, "checkpoint": str(tmp_path)}, 10, False)  # a folder, not "does not exist"
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="could not be read"):
        create_teacher({**TINY, "checkpoint": str(tmp_path / "bad.pt")}, 10, False)
    torch.save(build(TINY, 5, "teacher").state_dict(), tmp_path / "five.pth")
    with pytest.raises(UserError, match="trained for 5 classes but the data has 10"):
        create_teacher({**TINY, "checkpoint": str(tmp_path / "five.pth")}, 10, False)
    torch.save(build({**TINY, "depth": 3}, 10, "teacher").state_dict(), tmp_path / "deeper.pth")
    with pytest.raises(UserError, match="unexpected: blocks.2"):
        create_teacher({**TINY, "checkpoint": str(tmp_path / "deeper.pth")}, 10, False)


def test_missing_teacher_is_random_only_when_allowed(tmp_path, caplog):
    spec = {**TINY, "checkpoint": str(tmp_path / "missing.pt")}
    teacher, _, source = create_teacher(spec, 10, allow_random=True)
    assert "RANDOMLY INITIALISED TEACHER" in caplog.text and teacher.num_classes == 10
    assert source.startswith("random")


def test_teacher_sees_the_batch_in_its_own_normalisation_channels_and_size():
    model = build({"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "embed_dim": 24,
                   "depth": 1, "num_heads": 2}, 10, "teacher")
    s_mean, s_std, t_mean, t_std = 0.3, 0.4, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    teacher = Teacher(model, (t_mean, t_std), {"input_size": (1, 28, 28), "mean": (s_mean,), "std": (s_std,)})
    x = torch.randn(2, 1, 28, 28)
    raw = (x * s_std + s_mean).expand(-1, 3, -1, -1)
    expected = (raw - torch.tensor(t_mean).view(1, 3, 1, 1)) / torch.tensor(t_std).view(1, 3, 1, 1)
    expected = F.interpolate(expected, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(teacher.adapt(x), expected)
    teacher.train()
    assert not teacher.training and teacher(x).logits.shape == (2, 10)


def test_a_grey_teacher_sees_an_rgb_students_batch_as_its_own_grey_image():
    """The design card's pairing: a 224-px RGB student fed Fashion-MNIST (grey replicated to three
    channels, with the grey statistics), and the 28-px grey teacher of the embedded default."""
    model = build(TINY, 10, "teacher")
    s_mean, s_std, t_mean, t_std = (0.2860,), (0.3530,), (0.5,), (0.25,)
    teacher = Teacher(model, (t_mean, t_std), {"input_size": (3, 224, 224), "mean": s_mean, "std": s_std})
    grey = torch.rand(2, 1, 224, 224)
    colour = torch.rand(2, 3, 224, 224)
    for raw, luma in ((grey.expand(-1, 3, -1, -1), grey),
                      (colour, 0.299 * colour[:, :1] + 0.587 * colour[:, 1:2] + 0.114 * colour[:, 2:])):
        x = (raw - s_mean[0]) / s_std[0]
        expected = F.interpolate((luma - t_mean[0]) / t_std[0], size=(28, 28), mode="bilinear",
                                 antialias=True, align_corners=False)
        torch.testing.assert_close(teacher.adapt(x), expected, atol=1e-5, rtol=1e-5)
    assert teacher(x).logits.shape == (2, 10)


def test_channel_counts_a_teacher_cannot_bridge_are_named():
    model = build(TINY, 10, "teacher")
    with pytest.raises(UserError, match="1-channel images and the student 4-channel"):
        Teacher(model, ((0.5,), (0.5,)), {"input_size": (4, 28, 28), "mean": (0.5,) * 4, "std": (0.5,) * 4})


def test_weights_of_another_width_are_a_user_error_naming_the_shapes(tmp_path):
    """PyTorch raises on a shape even with strict=False: eval.py ckpt=... model=<wider> was a traceback."""
    torch.save({"model": build(TINY, 10, "model").state_dict()}, tmp_path / "narrow.pt")
    wide = build({**TINY, "embed_dim": 2 * TINY["embed_dim"]}, 10, "model")
    with pytest.raises(UserError) as e:
        load_weights(wide, tmp_path / "narrow.pt", "ckpt")
    said = " ".join(str(e.value).split())
    d = TINY["embed_dim"]
    assert said.startswith(f"ckpt={tmp_path / 'narrow.pt'} does not fit model.name=vit_tiny_patch16_224 (wrong shape: ")
    assert f"cls_token [1, 1, {d}] in the file, [1, 1, {2 * d}] in the model" in said


def test_an_image_size_that_is_not_whole_patches_is_refused():
    with pytest.raises(UserError, match=r"teacher.img_size=30 is not a multiple of the patch size 4: .* drop the "
                                        r"last 2 pixel rows or columns .* Use teacher.img_size=28 or 32"):
        build({**TINY, "img_size": 30}, 10, "teacher")
    assert build({**TINY, "img_size": 32}, 10, "model").patch_embed.grid_size == (8, 8)
    padded = build({**TINY, "img_size": 30, "dynamic_img_size": True, "dynamic_img_pad": True}, 10, "model")
    assert padded.forward_features(torch.zeros(1, 1, 30, 30)).shape[1] == 1 + 8 * 8  # every pixel in a patch
