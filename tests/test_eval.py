"""eval.py on our checkpoints and on a timm weights file: the numbers of the run it came from."""

import csv
import json

from conftest import debug_args, run_cli


def evaluation(tmp, *args):
    result = run_cli("eval.py", f"paths.log_dir={tmp}/logs", "hydra.run.dir=" + f"{tmp}/eval", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads((tmp / "eval" / "eval.json").read_text())


def test_eval_reproduces_the_run_on_its_checkpoint_and_on_the_exported_weights(tmp_path):
    assert run_cli("train.py", *debug_args(tmp_path, "kd=none", "trainer.export=true")).returncode == 0
    trained = json.loads((tmp_path / "run" / "summary.json").read_text())

    ours = evaluation(tmp_path, f"ckpt={tmp_path}/run/checkpoints/last.pt")
    assert ours["samples"] == 128
    assert abs(ours["top1"] - trained["top1"]) < 1e-6 and abs(ours["top5"] - trained["top5"]) < 1e-6
    rows = list(csv.DictReader((tmp_path / "eval" / "per_class.csv").open()))
    correct = sum(round(float(r["top1"]) * int(r["images"]) / 100) for r in rows)  # per class, to counts
    assert len(rows) == 10 and sum(int(r["images"]) for r in rows) == 128
    assert correct == round(ours["top1"] * 128 / 100)
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 5_000
    assert ours["images_per_s_model"] > 0 and ours["images_per_s_end_to_end"] > 0

    weights = tmp_path / "run" / "export" / "model.safetensors"
    timm_file = evaluation(tmp_path, f"ckpt={weights}", "model=vit_fmnist_student", "data=fashion_mnist",
                           "data.val_size=128")
    assert timm_file["top1"] == ours["top1"] and abs(timm_file["loss"] - ours["loss"]) < 1e-5  # batch sizes differ


def test_the_shipped_teacher_is_strong_and_timm_loadable(tmp_path):
    """The embedded default's teacher as shipped: eval.py on Fashion-MNIST's 10k test images gives
    the top-1 its model card (summary.json) records, at least 88%; plain timm loads it, with the
    data settings it was trained with."""
    import timm
    import torch

    from shd_vision.config import PROJECT_ROOT

    shipped = PROJECT_ROOT / "shd_vision/assets/vit_fmnist_teacher"
    card = json.loads((shipped / "summary.json").read_text())
    report = evaluation(tmp_path, f"ckpt={shipped}", "data=fashion_mnist")
    assert report["samples"] == 10_000 and report["top1"] >= 88.0
    assert abs(report["top1"] - card["top1"]) < 0.015  # the card's number, to rounding
    model = timm.create_model(f"local-dir:{shipped}", pretrained=True).eval()
    assert tuple(model.pretrained_cfg["input_size"]) == (1, 28, 28) and tuple(model.pretrained_cfg["mean"]) == (0.286,)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert sum(f.stat().st_size for f in shipped.iterdir()) < 4_000_000


def test_accuracy_against_counting_by_hand_and_refusals_of_meaningless_numbers():
    import pytest
    import torch

    from shd_vision.engine.metrics import evaluate, per_class_accuracy
    from shd_vision.engine.runtime import Runtime
    from shd_vision.errors import UserError

    rt = Runtime(device=torch.device("cpu"))
    logits = torch.tensor([[3.0, 1, 0], [3, 1, 0], [0, 3, 1], [1, 0, 3], [0, 1, 3]])
    labels = torch.tensor([0, 1, 1, 2, 1])  # right: rows 0, 2, 3; row 1 predicts 0, row 4 predicts 2
    loader = [(logits[:3], labels[:3]), (logits[3:], labels[3:])]  # batches of 3 and 2: the loss is per image
    m = evaluate(lambda x: x, loader, 3, rt)
    assert m["top1"] == pytest.approx(60.0) and m["top5"] == 100.0 and m["samples"] == 5
    assert m["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    assert m["confusion"].sum() == 5 and m["confusion"][2, 2] == 1
    recall = per_class_accuracy(torch.tensor([[2, 0, 0], [1, 1, 0], [0, 0, 0]]))
    assert recall[:2].tolist() == [100.0, 50.0] and torch.isnan(recall[2])  # no images: not 0%
    broken = logits.clone()
    broken[2] = float("nan")  # argmax of NaN is 0: a plausible top-1 if it were counted
    with pytest.raises(UserError, match="the teacher gave non-finite logits .* for 1 of 5 validation images"):
        evaluate(lambda x: x, [(broken, labels)], 3, rt, name="the teacher")


def test_eval_refuses_data_whose_class_names_differ_from_the_checkpoints(tmp_path):
    assert run_cli("train.py", *debug_args(tmp_path, "kd=none")).returncode == 0
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    import torch
    ckpt_path = tmp_path / "run/checkpoints/last.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["classes"] == names
    ckpt["classes"] = names[:5] + ["Sandals"] + names[6:]
    torch.save(ckpt, tmp_path / "renamed.pt")
    result = run_cli("eval.py", f"ckpt={tmp_path}/renamed.pt", "hydra.run.dir=" + f"{tmp_path}/eval")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "was trained on classes the data names differently or in another order (5: Sandals in the checkpoint, " \
           "Sandal here)" in " ".join(result.stderr.split())
    few = evaluation(tmp_path, f"ckpt={ckpt_path}", "data=fashion_mnist", "data.val_size=5")  # most classes: none
    rows = list(csv.DictReader((tmp_path / "eval" / "per_class.csv").open()))
    empty = [r["class"] for r in rows if r["images"] == "0"]
    assert few["samples"] == 5 and len(empty) >= 5
    assert all(few["per_class_top1"][c] is None for c in empty) and all(r["top1"] == "" for r in rows if r["class"] in empty)
    assert all(few["per_class_top1"][r["class"]] is not None for r in rows if r["class"] not in empty)
