"""tools/classify.py: image files of any size through the model exactly as the val LMDB goes
through evaluate.py (real Caffe, CPU, sample data)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import make_sample_lmdbs
from tinycaffe import classify, data, evaluate, gen


@pytest.fixture(scope="module")
def model(repo, tmp_path_factory):
    """(dataset dir, LMDB dir, [(deploy, weights)] of two short runs of `tiny`)."""
    root = tmp_path_factory.mktemp("classify")
    lmdb = make_sample_lmdbs(root, train=40, seed=6)
    gen.generate(["tiny"], gen.GenConfig(out=str(root / "p"), lmdb_dir=lmdb, mode="cpu", num_classes=10,
                                         val_size=200, max_iter=40, test_interval=40))
    models = []
    for iterations in (40, 60):  # two different models for the ensemble
        run_dir = str(root / ("run%d" % iterations))
        out = subprocess.run(["bash", "scripts/train.sh", str(root / "p" / "tiny" / "solver.prototxt"), "--gpu", "cpu",
                              "--run-dir", run_dir, "--max-iter", str(iterations)], cwd=repo, capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        models.append((os.path.join(run_dir, "deploy.prototxt"),
                       os.path.join(run_dir, "snapshots", "tiny_iter_%d.caffemodel" % iterations)))
    return str(root / "tiny-imagenet-200"), lmdb, models


def classify_cli(repo, args):
    return subprocess.run([sys.executable, "tools/classify.py"] + args, cwd=repo, capture_output=True, text=True)


def model_args(models):
    return [a for pair in models for a in ["--model", pair[0], pair[1]]]


def val_images(dataset):
    folder = os.path.join(dataset, "val", "images")
    return [os.path.join(folder, "val_%d.JPEG" % i) for i in range(len(os.listdir(folder)))]


def test_val_jpegs_get_the_val_lmdbs_probabilities(model):
    dataset, lmdb, models = model
    val = os.path.join(lmdb, "val_lmdb")
    for chosen in (models[:1], models):  # one model, and the ensemble of two
        found, kept = classify.Classifier(chosen).probabilities(val_images(dataset))
        assert kept == val_images(dataset)
        nets = [(evaluate.load_net(d, w), 1.0) for d, w in chosen]
        pre = evaluate.ensemble_preprocessing([d for d, _ in chosen], None, os.path.join(lmdb, "mean.binaryproto"),
                                              False, val, evaluate.net_crop(nets[0][0]))
        expected = evaluate.predict(nets, val, pre).probs  # the LMDB holds val_0.. in this order
        np.testing.assert_array_equal(found, expected)


def test_top1_equals_evaluates_center_top1(repo, model):
    dataset, lmdb, models = model
    out = classify_cli(repo, [os.path.join(dataset, "val", "images"), "--top", "1", "--json"] + model_args(models[:1]))
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    truth = dict(line.split("\t")[:2] for line in open(os.path.join(dataset, "val", "val_annotations.txt")))
    top1 = np.mean([truth[os.path.basename(r["image"])] == r["top"][0]["wnid"] for r in results])
    deploy, weights = models[0]
    ev = subprocess.run([sys.executable, "tools/evaluate.py", "--deploy", deploy, "--weights", weights, "--lmdb",
                         os.path.join(lmdb, "val_lmdb"), "--quiet"], cwd=repo, capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    assert "top-1 %.4f " % top1 in ev.stdout.splitlines()[0], (top1, ev.stdout)


def test_any_size_and_mode_and_the_json_shape(repo, model, tmp_path):
    dataset, lmdb, models = model
    src = val_images(dataset)[0]
    with Image.open(src) as im:
        im.convert("L").resize((100, 80)).save(tmp_path / "grey_wide.png")
        im.save(tmp_path / "same.jpg", quality=95)
    out = classify_cli(repo, [str(tmp_path), "--json"] + model_args(models))
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert [os.path.basename(r["image"]) for r in results] == ["grey_wide.png", "same.jpg"]
    labels = data.read_labels(os.path.join(lmdb, "labels.txt"))
    for r in results:
        assert set(r) == {"image", "top"} and len(r["top"]) == 5
        assert all(set(c) == {"wnid", "words", "prob"} for c in r["top"])
        probs = [c["prob"] for c in r["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all((c["wnid"], c["words"]) in labels for c in r["top"])
    text = classify_cli(repo, [str(tmp_path / "same.jpg"), "--top", "2"] + model_args(models[:1]))
    assert text.returncode == 0 and text.stdout.splitlines()[0].endswith("same.jpg")
    assert len(text.stdout.splitlines()) == 3 and text.stdout.splitlines()[1].startswith("  1. ")


@pytest.mark.parametrize("case", ["missing", "not_an_image", "empty_dir", "no_lmdb", "top0", "weights"])
def test_bad_input_is_one_line(repo, model, tmp_path, case):
    dataset, lmdb, models = model
    image = val_images(dataset)[0]
    args, expect = {
        "missing": ([str(tmp_path / "nope.jpg")], "nope.jpg: no such image file or folder"),
        "not_an_image": ([str(tmp_path / "notes.jpg")], "notes.jpg"),
        "empty_dir": ([str(tmp_path / "empty")], "no JPEG or PNG files in this folder"),
        "no_lmdb": ([image], "give --lmdb"),
        "top0": ([image, "--top", "0"], "--top 0: expected a number of classes >= 1"),
        "weights": ([image, "--weight", "1", "--weight", "2"], "2 --weight values for 1 --model pairs"),
    }[case]
    (tmp_path / "notes.jpg").write_text("not a picture")
    (tmp_path / "empty").mkdir()
    chosen = models[:1]
    if case == "no_lmdb":  # a model copied away from its run dir: no train_val beside it
        os.makedirs(tmp_path / "m")
        chosen = [(shutil.copy(models[0][0], tmp_path / "m"), models[0][1])]
    out = classify_cli(repo, args + model_args(chosen))
    assert out.returncode == 1, out.stdout
    lines = out.stderr.strip().splitlines()
    assert expect in lines[0], out.stderr
    assert len(lines) == (2 if case == "not_an_image" else 1), out.stderr  # an unreadable image: + the count


def test_a_bad_image_in_a_folder_spoils_nothing_else(repo, model, tmp_path):
    dataset, _, models = model
    shutil.copy(val_images(dataset)[0], tmp_path / "good.jpg")
    (tmp_path / "bad.jpg").write_text("not a picture")
    os.makedirs(tmp_path / "elsewhere")
    shutil.copy(val_images(dataset)[1], tmp_path / "elsewhere" / "linked.jpg")
    os.makedirs(tmp_path / "dir")
    os.symlink(tmp_path / "elsewhere", tmp_path / "dir" / "link")  # a symlinked subfolder is searched too
    os.symlink(tmp_path / "dir", tmp_path / "dir" / "loop")  # and a loop ends
    out = classify_cli(repo, [str(tmp_path / "dir"), str(tmp_path / "good.jpg"), str(tmp_path / "bad.jpg"),
                              "--json"] + model_args(models[:1]))
    assert out.returncode == 1
    assert [os.path.basename(r["image"]) for r in json.loads(out.stdout)] == ["linked.jpg", "good.jpg"]
    assert "bad.jpg" in out.stderr and "1 of 3 images could not be read" in out.stderr
