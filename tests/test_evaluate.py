"""evaluate.py, make_submission.py (and --validate), visualize.py on a model trained in the test."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image

from tinycaffe import data, evaluate, gen, nets, sample_data, submit, visualize
from tinycaffe.caffe_env import caffe_binary, caffe_pb2


@pytest.fixture(scope="module")
def trained(tmp_path_factory, repo):
    """The tiny variant trained 150 iterations on a 10-class sample, snapshots at 100 and 150."""
    root = tmp_path_factory.mktemp("eval")
    ds = str(root / "tiny-imagenet-200")
    sample_data.generate(ds, classes=10, train=40, val=10, test=12, seed=6)
    lmdb = str(root / "lmdb")
    data.make_lmdbs(ds, lmdb, workers=2)
    cfg = gen.GenConfig(out=str(root / "p"), lmdb_dir=lmdb, mode="cpu", num_classes=10, val_size=100,
                        max_iter=150, test_interval=150)
    gen.generate(["tiny"], cfg)
    solver = os.path.join(cfg.out, "tiny", "solver.prototxt")
    s = caffe_pb2().SolverParameter()
    text_format.Merge(open(solver).read(), s)
    s.snapshot = 100
    open(solver, "w").write(text_format.MessageToString(s))
    out = subprocess.run(["bash", "scripts/train.sh", solver, "--gpu", "cpu", "--runs-root", str(root / "runs")],
                         cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    run_dir = [os.path.join(root, "runs", "tiny", d) for d in os.listdir(root / "runs" / "tiny")][0]
    snaps = os.path.join(run_dir, "snapshots")
    return {"lmdb": lmdb, "run": run_dir, "deploy": os.path.join(run_dir, "deploy.prototxt"),
            "train_val": os.path.join(run_dir, "train_val.prototxt"),
            "w150": os.path.join(snaps, "tiny_iter_150.caffemodel"),
            "w100": os.path.join(snaps, "tiny_iter_100.caffemodel"), "root": root}


def tool(repo, name, *args):
    return subprocess.run([sys.executable, "tools/%s.py" % name, *args], cwd=repo, capture_output=True, text=True)


def lmdb_args(t, split="val"):
    return ["--lmdb", os.path.join(t["lmdb"], split + "_lmdb"), "--mean", os.path.join(t["lmdb"], "mean.binaryproto")]


def caffe_test_accuracies(stderr):
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"\] (accuracy_top[15]) = ([\d.e+-]+)", stderr)}


def run_caffe_test(model, weights, iterations=1):
    env = dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel="0")
    out = subprocess.run([caffe_binary(), "test", "-model", model, "-weights", weights, "-iterations",
                          str(iterations)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return caffe_test_accuracies(out.stderr)


def test_center_top1_equals_caffe_test(repo, trained):
    out = tool(repo, "evaluate", "--deploy", trained["deploy"], "--weights", trained["w150"], "--quiet",
               *lmdb_args(trained))
    assert out.returncode == 0, out.stderr
    ours = json.load(open(os.path.join(trained["run"], "eval_center.json")))
    env = dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel="0")
    caffe_test = subprocess.run([caffe_binary(), "test", "-model", trained["train_val"], "-weights", trained["w150"],
                                 "-iterations", "1"], capture_output=True, text=True, env=env)
    assert caffe_test.returncode == 0, caffe_test.stderr[-2000:]
    theirs = caffe_test_accuracies(caffe_test.stderr)
    assert ours["images"] == 100
    # Equal to the digits Caffe prints (%g: 6 significant), not "within one image".
    assert float("%g" % ours["top1"]) == theirs["accuracy_top1"]
    assert float("%g" % ours["top5"]) == theirs["accuracy_top5"]
    assert ours["top5"] >= ours["top1"] > 0.2  # trained: well above the 0.1 chance
    rows = list(csv.DictReader(open(os.path.join(trained["run"], "per_class_center.csv"))))
    assert len(rows) == 10 and sum(int(r["images"]) for r in rows) == 100
    assert sum(float(r["top1"]) * int(r["images"]) for r in rows) == pytest.approx(ours["top1"] * 100)
    assert "most confused" in out.stdout and "images/s" in out.stdout


@pytest.mark.parametrize("tta", ["mirror", "10crop"])
def test_tta_modes_run(repo, trained, tta):
    out = tool(repo, "evaluate", "--deploy", trained["deploy"], "--weights", trained["w150"], "--quiet",
               "--tta", tta, *lmdb_args(trained))
    assert out.returncode == 0, out.stderr
    result = json.load(open(os.path.join(trained["run"], "eval_%s.json" % tta)))
    assert result["tta"] == tta and 0 < result["top1"] <= result["top5"] <= 1


# The views of a 64x64 image for a 60x60 crop, written out by hand: (rows, cols, mirrored).
HAND_VIEWS = {
    "mirror": [(slice(2, 62), slice(2, 62), False), (slice(2, 62), slice(2, 62), True)],
    "10crop": [(slice(y, y + 60), slice(x, x + 60), f) for f in (False, True)
               for y, x in ((0, 0), (0, 4), (4, 0), (4, 4), (2, 2))],
}


@pytest.mark.parametrize("tta", ["mirror", "10crop"])
def test_tta_equals_a_direct_computation_of_the_views(trained, caffe, tta):
    """Each image's TTA probabilities = the mean softmax of its views cut and flipped (left-right:
    the width axis) in numpy here; a wrong flip axis or crop offset fails."""
    net = evaluate.load_net(trained["deploy"], trained["w150"])
    mean = data.read_mean(os.path.join(trained["lmdb"], "mean.binaryproto"))
    val = os.path.join(trained["lmdb"], "val_lmdb")
    pred = evaluate.predict([(net, 1.0)], val, mean, tta, batch=7)
    direct = caffe.Net(trained["deploy"], caffe.TEST, weights=trained["w150"])
    for i, (key, datum) in enumerate(data.iter_lmdb(val, limit=6)):
        img = np.frombuffer(datum.data, np.uint8).reshape(3, 64, 64).astype(np.float32) - mean
        stack = np.stack([img[:, ys, xs][:, :, ::-1] if flip else img[:, ys, xs] for ys, xs, flip in HAND_VIEWS[tta]])
        direct.blobs["data"].reshape(*stack.shape)
        probs = direct.forward(data=stack)["prob"]
        assert pred.keys[i] == key
        np.testing.assert_allclose(pred.probs[i], probs.mean(axis=0), rtol=1e-5, atol=1e-7)
        assert not np.allclose(probs[0], probs[-1])  # the views differ, so the check has teeth


def test_crop_offsets():
    assert evaluate.crop_offsets(64, 60, "center") == [(2, 2, False)]
    ten = evaluate.crop_offsets(64, 60, "10crop")
    assert len(ten) == 10 and len(set(ten)) == 10 and (0, 4, True) in ten and (2, 2, True) in ten


def read_submission(path):
    return [line.rstrip("\n").split(" ") for line in open(path)]


def test_submission_matches_a_direct_forward(repo, trained, caffe, tmp_path):
    out_file = tmp_path / "submission.txt"
    out = tool(repo, "make_submission", "--model", trained["deploy"], trained["w150"], *lmdb_args(trained, "test"),
               "--out", str(out_file))
    assert out.returncode == 0, out.stderr
    lines = read_submission(out_file)
    assert [name for name, _ in lines] == ["test_%d.JPEG" % i for i in range(120)]
    labels = data.read_labels(os.path.join(trained["lmdb"], "labels.txt"))
    assert {w for _, w in lines} <= {w for w, _ in labels}
    assert open(out_file).read().endswith("\n")
    # A plain pycaffe forward of the center crop, image by image.
    net = caffe.Net(trained["deploy"], caffe.TEST, weights=trained["w150"])
    mean = data.read_mean(os.path.join(trained["lmdb"], "mean.binaryproto"))
    for key, datum in data.iter_lmdb(os.path.join(trained["lmdb"], "test_lmdb"), limit=15):
        img = np.frombuffer(datum.data, np.uint8).reshape(3, 64, 64).astype(np.float32) - mean
        prob = net.forward(data=img[None, :, 2:62, 2:62])["prob"][0]
        name = submit.name_of_key(key)
        assert dict(lines)[name] == labels[int(prob.argmax())][0], name


def test_ensembles(repo, trained, tmp_path):
    single, double, mixed = tmp_path / "one.txt", tmp_path / "two.txt", tmp_path / "mix.txt"
    test = lmdb_args(trained, "test")
    assert tool(repo, "make_submission", "--model", trained["deploy"], trained["w150"], *test, "--out", str(single),
                "--top5-csv", str(tmp_path / "one.csv")).returncode == 0
    out = tool(repo, "make_submission", "--model", trained["deploy"], trained["w150"], "--model", trained["deploy"],
               trained["w150"], *test, "--out", str(double), "--val-lmdb", os.path.join(trained["lmdb"], "val_lmdb"))
    assert out.returncode == 0, out.stderr
    assert open(single).read() == open(double).read()
    assert len(re.findall(r"val top-1 [\d.]+", out.stdout)) == 3 and "ensemble of 2" in out.stdout
    assert tool(repo, "make_submission", "--model", trained["deploy"], trained["w100"], *test, "--out",
                str(tmp_path / "w100.txt"), "--top5-csv", str(tmp_path / "w100.csv")).returncode == 0
    out = tool(repo, "make_submission", "--model", trained["deploy"], trained["w150"], "--model", trained["deploy"],
               trained["w100"], "--weight", "3", "--weight", "1", *test, "--out", str(mixed),
               "--top5-csv", str(tmp_path / "mix.csv"))
    assert out.returncode == 0, out.stderr

    def scores(path):
        return {row["image"]: dict(zip([row["wnid%d" % k] for k in range(1, 6)],
                                       [float(row["score%d" % k]) for k in range(1, 6)]))
                for row in csv.DictReader(open(path))}
    a, b, m = scores(tmp_path / "one.csv"), scores(tmp_path / "w100.csv"), scores(tmp_path / "mix.csv")
    checked = 0
    for image, top in m.items():
        for wnid, p in top.items():
            if wnid in a[image] and wnid in b[image]:
                assert p == pytest.approx(0.75 * a[image][wnid] + 0.25 * b[image][wnid], abs=2e-6)
                checked += 1
    assert checked > 100


@pytest.fixture
def good_submission(repo, trained, tmp_path):
    path = tmp_path / "good.txt"
    assert tool(repo, "make_submission", "--model", trained["deploy"], trained["w150"], *lmdb_args(trained, "test"),
                "--out", str(path)).returncode == 0
    return path


def validate(repo, trained, path):
    return tool(repo, "make_submission", "--validate", str(path), *lmdb_args(trained, "test")[:2])


def test_validate_accepts_a_good_file(repo, trained, good_submission):
    out = validate(repo, trained, good_submission)
    assert out.returncode == 0, out.stderr
    assert "valid, 120 images" in out.stdout


@pytest.mark.parametrize("edit, needle", [
    (lambda ls: ls[:5] + ls[6:], "1 test images missing"),
    (lambda ls: ls[:5] + ls[7:], "bad.txt: missing test_6.JPEG"),
    (lambda ls: ls[:6] + [ls[5]] + ls[6:], ":7: test_5.JPEG again (first on line 6)"),
    (lambda ls: ls[:3] + ["test_3.JPEG n99999999\n"] + ls[4:], ":4: unknown wnid n99999999"),
    (lambda ls: ls[:2] + ["test_2.JPEG\n"] + ls[3:], ":3: malformed line 'test_2.JPEG'"),
    (lambda ls: ls + ["test_500.JPEG " + ls[0].split()[1] + "\n"], ":121: test_500.JPEG is not in the test set"),
    (lambda ls: [ls[1], ls[0]] + ls[2:], ":2: test_0.JPEG out of order"),
])
def test_validate_rejects_with_line_numbers(repo, trained, good_submission, tmp_path, edit, needle):
    bad = tmp_path / "bad.txt"
    bad.write_text("".join(edit(open(good_submission).readlines())))
    out = validate(repo, trained, bad)
    assert out.returncode == 1 and needle in out.stderr, out.stderr


def test_visualize_pngs_and_report(repo, trained, tmp_path):
    out_dir = tmp_path / "vis"
    assert tool(repo, "evaluate", "--deploy", trained["deploy"], "--weights", trained["w150"], "--quiet",
                "--out", str(out_dir), *lmdb_args(trained)).returncode == 0
    out = tool(repo, "visualize", "--deploy", trained["deploy"], "--weights", trained["w150"], "--out", str(out_dir),
               *lmdb_args(trained))
    assert out.returncode == 0, out.stderr
    with Image.open(out_dir / "filters.png") as im:  # 16 filters of 3x3, 8 px per weight, 4 per row
        assert im.size == visualize.grid_size(16, 24, 24, 4) == (106, 106)
    with Image.open(out_dir / "features_conv1_1.png") as im:  # 16 maps of 60x60 doubled
        assert im.size == visualize.grid_size(16, 120, 120, 4)
    with Image.open(out_dir / "features_conv2_1.png") as im:  # 32 maps of 30x30 doubled, 6 per row
        assert im.size == visualize.grid_size(32, 60, 60, 6)
    report = open(out_dir / "report.md").read()
    referenced = re.findall(r"\]\(([^)]+)\)", report)
    assert "filters.png" in referenced and all(os.path.isfile(out_dir / r) for r in referenced)
    assert "top-1" in report and "| true | predicted | count |" in report


def test_mismatched_weights_are_named(repo, trained, tmp_path):
    renamed = tmp_path / "deploy_renamed.prototxt"
    renamed.write_text(open(trained["deploy"]).read().replace('name: "fc_out"', 'name: "classifier"'))
    out = tool(repo, "evaluate", "--deploy", str(renamed), "--weights", trained["w150"], "--quiet", *lmdb_args(trained))
    assert out.returncode == 1 and "layer 'classifier' has no weights in" in out.stderr
    wider = tmp_path / "deploy_wider.prototxt"
    wider.write_text(open(trained["deploy"]).read().replace("num_output: 128", "num_output: 64"))
    out = tool(repo, "evaluate", "--deploy", str(wider), "--weights", trained["w150"], "--quiet", *lmdb_args(trained))
    assert out.returncode == 1 and "layer 'fc1' has shapes [[128, 4096], [128]]" in out.stderr


def test_lmdb_of_another_dataset_is_refused(repo, trained, tmp_path):
    other = str(tmp_path / "other")
    sample_data.generate(other, classes=6, train=2, val=2, test=3, seed=1)
    data.make_lmdbs(other, str(tmp_path / "olmdb"), workers=1, splits=["test"])
    out = tool(repo, "make_submission", "--model", trained["deploy"], trained["w150"], "--lmdb",
               str(tmp_path / "olmdb" / "test_lmdb"), "--mean", os.path.join(trained["lmdb"], "mean.binaryproto"),
               "--out", str(tmp_path / "s.txt"))
    assert out.returncode == 1 and "has 10 class outputs but" in out.stderr and "lists 6 classes" in out.stderr
    assert not (tmp_path / "s.txt").exists()


# ---------------------------------------------------------------- Caffe's top-k rule, ties included
def accuracy_net(tmp_path, n, classes, k):
    path = tmp_path / ("accuracy_top%d.prototxt" % k)
    path.write_text('layer { name: "scores" type: "Input" top: "scores" top: "label" input_param { shape { dim: %d '
                    'dim: %d } shape { dim: %d } } }\n'
                    'layer { name: "acc" type: "Accuracy" bottom: "scores" bottom: "label" top: "acc" '
                    'accuracy_param { top_k: %d } }\n' % (n, classes, n, k))
    return str(path)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_topk_equals_caffes_accuracy_layer_with_ties_and_nans(caffe, tmp_path, k):
    """Scores from a small set of values (many ties), some NaN: the same fraction as Caffe's layer."""
    rng = np.random.RandomState(k)
    scores = rng.randint(0, 3, size=(200, 6)).astype(np.float32)
    scores[:3] = 0.0  # all tied
    scores[3:6, 2] = np.nan  # NaN true scores (labels below are 2 there)
    scores[6:9, 0] = np.nan  # NaN rivals
    labels = rng.randint(0, 6, size=200)
    labels[3:6] = 2
    net = caffe.Net(accuracy_net(tmp_path, 200, 6, k), caffe.TEST)
    net.blobs["scores"].data[...] = scores
    net.blobs["label"].data[...] = labels
    theirs = float(net.forward()["acc"])
    ours = evaluate.topk_accuracy(scores, labels, k)
    assert np.float32(ours) == np.float32(theirs)
    assert evaluate.topk_accuracy(np.zeros((4, 6), np.float32), np.arange(4), k) == 0.0  # a tie is wrong
    assert evaluate.topk_accuracy(np.zeros((0, 6), np.float32), np.zeros(0, np.int64), k) == 0.0


@pytest.fixture(scope="module")
def zeroed(trained, caffe):
    """The trained model with every weight and bias set to zero: every class scores the same."""
    net = caffe.Net(trained["deploy"], caffe.TEST, weights=trained["w150"])
    for params in net.params.values():
        for blob in params:
            blob.data[...] = 0
    path = os.path.join(str(trained["root"]), "zeroed.caffemodel")
    net.save(path)
    return path


def test_ties_count_against_the_label_as_in_caffe_test(repo, trained, zeroed, tmp_path):
    theirs = run_caffe_test(trained["train_val"], zeroed)
    assert theirs == {"accuracy_top1": 0.0, "accuracy_top5": 0.0}
    out = tool(repo, "evaluate", "--deploy", trained["deploy"], "--weights", zeroed, "--quiet",
               "--out", str(tmp_path), *lmdb_args(trained))
    assert out.returncode == 0, out.stderr
    ours = json.load(open(tmp_path / "eval_center.json"))
    assert (ours["top1"], ours["top5"]) == (0.0, 0.0) and "top-1 0.0000  top-5 0.0000" in out.stdout
    rows = list(csv.DictReader(open(tmp_path / "per_class_center.csv")))
    assert {r["top1"] for r in rows} == {"0.0000"}
    out = tool(repo, "make_submission", "--model", trained["deploy"], zeroed, "--model", trained["deploy"], zeroed,
               *lmdb_args(trained, "test"), "--out", str(tmp_path / "s.txt"),
               "--val-lmdb", os.path.join(trained["lmdb"], "val_lmdb"))
    assert out.returncode == 0, out.stderr
    assert re.findall(r"val top-1 ([\d.]+)", out.stdout) == ["0.0000"] * 3


@pytest.fixture(scope="module")
def nan_model(trained, caffe):
    """The trained model with NaN classifier biases: every score of every image is NaN."""
    net = caffe.Net(trained["deploy"], caffe.TEST, weights=trained["w150"])
    net.params["fc_out"][1].data[...] = np.nan
    path = os.path.join(str(trained["root"]), "nan.caffemodel")
    net.save(path)
    return path


def test_a_model_with_non_finite_outputs_gets_no_score(repo, trained, nan_model, tmp_path):
    theirs = run_caffe_test(trained["train_val"], nan_model)
    assert theirs["accuracy_top1"] == 1.0  # Caffe's Accuracy counts a NaN score as right: what we must not say
    out = tool(repo, "evaluate", "--deploy", trained["deploy"], "--weights", nan_model, "--quiet",
               "--out", str(tmp_path), *lmdb_args(trained))
    assert out.returncode == 1 and not os.listdir(tmp_path), out.stdout
    assert out.stderr.strip() == ("evaluate.py: error: %s: its outputs hold NaN or inf for 100 of 100 images (diverged "
                                  "weights): no score; use an earlier snapshot" % nan_model)
    for extra in ([], ["--val-lmdb", os.path.join(trained["lmdb"], "val_lmdb")]):
        out = tool(repo, "make_submission", "--model", trained["deploy"], trained["w150"], "--model",
                   trained["deploy"], nan_model, *lmdb_args(trained, "test"), "--out", str(tmp_path / "s.txt"), *extra)
        assert out.returncode == 1 and not os.path.exists(tmp_path / "s.txt"), out.stdout
        assert "%s: its outputs hold NaN or inf for" % nan_model in out.stderr and "val top-1" not in out.stdout


# ---------------------------------------------------------------- data that does not fit the model
@pytest.fixture(scope="module")
def small_images(trained, tmp_path_factory):
    """The same 10 classes, as 32x32 LMDBs: smaller than the model's 60x60 crop."""
    root = tmp_path_factory.mktemp("small")
    ds = str(root / "tiny-imagenet-200")
    sample_data.generate(ds, classes=10, train=4, val=2, test=2, seed=3)
    data.make_lmdbs(ds, str(root / "lmdb"), workers=1, size=32)
    return str(root / "lmdb")


@pytest.mark.parametrize("name", ["evaluate", "visualize", "make_submission"])
def test_images_smaller_than_the_crop_are_refused(repo, trained, small_images, name, tmp_path):
    split = "test" if name == "make_submission" else "val"
    model = (["--model", trained["deploy"], trained["w150"], "--out", str(tmp_path / "s.txt")]
             if name == "make_submission" else ["--deploy", trained["deploy"], "--weights", trained["w150"],
                                                "--out", str(tmp_path)])
    out = tool(repo, name, *model, "--lmdb", os.path.join(small_images, split + "_lmdb"))
    assert out.returncode == 1, out.stderr[-2000:]
    assert "crops 60x60 but the images of" in out.stderr and "are 32x32" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_visualize_refuses_a_mean_of_another_size(repo, trained, small_images, tmp_path):
    out = tool(repo, "visualize", "--deploy", trained["deploy"], "--weights", trained["w150"], "--out",
               str(tmp_path), "--lmdb", os.path.join(trained["lmdb"], "val_lmdb"), "--mean",
               os.path.join(small_images, "mean.binaryproto"))
    assert out.returncode == 1
    # The net's own preprocessing (its train_val's mean file), as evaluate.py uses: another mean is refused.
    assert "was trained with mean file %s" % os.path.join(trained["lmdb"], "mean.binaryproto") in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_visualize_refuses_another_class_count(repo, trained, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(open(os.path.join(trained["lmdb"], "labels.txt")).readlines()[:5]))
    out = tool(repo, "visualize", "--deploy", trained["deploy"], "--weights", trained["w150"], "--out",
               str(tmp_path), *lmdb_args(trained), "--labels", str(labels))
    assert out.returncode == 1 and "has 10 class outputs but" in out.stderr and "lists 5 classes" in out.stderr


# ---------------------------------------------------------------- submissions of incomplete test sets
@pytest.fixture(scope="module")
def skipped_test_image(trained, tmp_path_factory):
    """A copy of the sample whose test_3.JPEG cannot be decoded, converted with --skip-bad."""
    root = tmp_path_factory.mktemp("skip")
    ds = str(root / "tiny-imagenet-200")
    sample_data.generate(ds, classes=10, train=2, val=1, test=2, seed=6)
    with open(os.path.join(ds, "test", "images", "test_3.JPEG"), "wb") as f:
        f.write(b"not a jpeg")
    data.make_lmdbs(ds, str(root / "lmdb"), workers=1, skip_bad=True, splits=["test"])
    return str(root / "lmdb")


def test_submission_of_an_incomplete_test_lmdb(repo, trained, skipped_test_image, tmp_path):
    test = ["--lmdb", os.path.join(skipped_test_image, "test_lmdb"), "--mean",
            os.path.join(trained["lmdb"], "mean.binaryproto"), "--labels", os.path.join(trained["lmdb"], "labels.txt")]
    out_file = tmp_path / "s.txt"
    out = tool(repo, "make_submission", "--model", trained["deploy"], trained["w150"], *test, "--out", str(out_file))
    assert out.returncode == 1 and not out_file.exists()
    assert "lacks 1 of the 20 test images of its manifest (first test_3.JPEG" in out.stderr
    assert "--allow-missing" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = tool(repo, "make_submission", "--model", trained["deploy"], trained["w150"], *test, "--out", str(out_file),
               "--allow-missing")
    assert out.returncode == 0, out.stderr
    assert "19 lines" in out.stdout and "1 test images missing (--allow-missing): first test_3.JPEG" in out.stdout
    out = tool(repo, "make_submission", "--validate", str(out_file), *test[:2], *test[4:])
    assert out.returncode == 1
    assert "s.txt: 1 test images missing" in out.stderr and "s.txt: missing test_3.JPEG" in out.stderr


# ---------------------------------------------------------------- one-line errors before any long work
def one_line_error(out, needle):
    assert out.returncode == 1, out.stdout + out.stderr
    assert needle in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr


def test_one_line_errors(repo, trained, tmp_path):
    nowhere = str(tmp_path / "no_such.caffemodel")  # never opened: each check comes first
    val, test = lmdb_args(trained), lmdb_args(trained, "test")
    one_line_error(tool(repo, "make_submission", "--model", trained["deploy"], nowhere, *test,
                        "--out", str(tmp_path / "NO_SUCH_DIR" / "sub.txt")), "--out %s" % tmp_path)
    one_line_error(tool(repo, "make_submission", "--model", trained["deploy"], nowhere, *val,
                        "--out", str(tmp_path / "s.txt")), "its records are labelled (a val or train LMDB)")
    one_line_error(tool(repo, "make_submission", "--validate", str(tmp_path / "s.txt"), *val),
                   "needs the unlabelled test LMDB")
    one_line_error(tool(repo, "evaluate", "--deploy", trained["deploy"], "--weights", nowhere, *test),
                   "a test LMDB (unlabelled records, label -1); evaluate.py needs a labelled one")
    one_line_error(tool(repo, "evaluate", "--deploy", trained["deploy"], "--weights", nowhere, *val, "--batch", "0"),
                   "--batch 0: expected images per forward >= 1")
    one_line_error(tool(repo, "make_submission", "--model", trained["deploy"], nowhere, *test, "--batch", "0",
                        "--out", str(tmp_path / "s.txt")), "--batch 0: expected images per forward >= 1")
    one_line_error(tool(repo, "lmdb_info", str(tmp_path / "missing_lmdb")), "missing_lmdb: no such LMDB directory")
    one_line_error(tool(repo, "make_submission", "--model", trained["deploy"], nowhere, *test, "--out", str(tmp_path)),
                   "--out %s: is a directory (expected a file name" % tmp_path)


def test_val_lmdb_of_another_dataset_is_refused_before_inference(repo, trained, tmp_path):
    other = str(tmp_path / "other")
    sample_data.generate(other, classes=12, train=1, val=1, test=1, seed=2)
    data.make_lmdbs(other, str(tmp_path / "olmdb"), workers=1, splits=["val"])
    out = tool(repo, "make_submission", "--model", trained["deploy"], trained["w150"], *lmdb_args(trained, "test"),
               "--out", str(tmp_path / "s.txt"), "--val-lmdb", str(tmp_path / "olmdb" / "val_lmdb"))
    one_line_error(out, "has 10 class outputs but %s lists 12 classes" % (tmp_path / "olmdb" / "labels.txt"))
    os.unlink(tmp_path / "olmdb" / "labels.txt")  # no labels beside it: the labels in the records still tell
    out = tool(repo, "make_submission", "--model", trained["deploy"], trained["w150"], *lmdb_args(trained, "test"),
               "--out", str(tmp_path / "s.txt"), "--val-lmdb", str(tmp_path / "olmdb" / "val_lmdb"))
    one_line_error(out, "val_lmdb has labels up to 11 but the models have 10 class outputs")
    assert not (tmp_path / "s.txt").exists()


def test_an_ensemble_of_different_crops_is_refused(trained, caffe, tmp_path):
    narrow = tmp_path / "deploy56.prototxt"
    narrow.write_text(text_format.MessageToString(nets.deploy("tiny", 10, 56)))
    pairs = [(caffe.Net(trained["deploy"], caffe.TEST), 1.0), (caffe.Net(str(narrow), caffe.TEST), 1.0)]
    mean = data.read_mean(os.path.join(trained["lmdb"], "mean.binaryproto"))
    with pytest.raises(evaluate.EvalError) as err:
        evaluate.predict(pairs, os.path.join(trained["lmdb"], "val_lmdb"), mean)
    assert "take different crops [56, 60]" in str(err.value)


def test_mean_and_labels_default_to_the_ones_beside_the_lmdb(repo, trained, small_images, tmp_path):
    """From another directory, with only --lmdb: X/mean.binaryproto and X/labels.txt are the ones
    read (a mean or labels planted beside the LMDB are what the errors name), never data/lmdb's."""
    x = tmp_path / "X"
    x.mkdir()
    shutil.copytree(os.path.join(trained["lmdb"], "val_lmdb"), x / "val_lmdb")

    bare = tmp_path / "bare"  # a deploy file without its train_val beside: the mean beside the LMDB is used
    bare.mkdir()
    shutil.copy(trained["deploy"], bare / "deploy.prototxt")

    def evaluate_x(deploy=str(bare / "deploy.prototxt")):
        return subprocess.run([sys.executable, os.path.join(repo, "tools", "evaluate.py"), "--deploy",
                               deploy, "--weights", trained["w150"], "--quiet", "--lmdb", "X/val_lmdb",
                               "--out", "here"], cwd=str(tmp_path), capture_output=True, text=True)
    one_line_error(evaluate_x(), "%s: missing (expected labels.txt" % (x / "labels.txt"))
    (x / "labels.txt").write_text("".join(open(os.path.join(trained["lmdb"], "labels.txt")).readlines()[:4]))
    one_line_error(evaluate_x(), "lists 4 classes")
    shutil.copy(os.path.join(trained["lmdb"], "labels.txt"), x / "labels.txt")
    shutil.copy(os.path.join(small_images, "mean.binaryproto"), x / "mean.binaryproto")
    one_line_error(evaluate_x(), "%s is 3x32x32 but the images of" % (x / "mean.binaryproto"))
    # The run's deploy: its train_val says which mean it was trained with; the one beside the LMDB is not read.
    out = evaluate_x(trained["deploy"])
    assert out.returncode == 0, out.stderr
    said = json.load(open(tmp_path / "here" / "eval_center.json"))["preprocessing"]
    assert said.startswith("minus %s" % os.path.join(trained["lmdb"], "mean.binaryproto")) and trained["run"] in said
    shutil.copy(os.path.join(trained["lmdb"], "mean.binaryproto"), x / "mean.binaryproto")
    out = evaluate_x()
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "here" / "eval_center.json").is_file()  # --out relative to the user's directory


def test_make_submission_quiet_prints_one_line(repo, trained, tmp_path):
    args = ["--model", trained["deploy"], trained["w150"], *lmdb_args(trained, "test"), "--out"]
    loud = tool(repo, "make_submission", *args, str(tmp_path / "a.txt"))
    assert loud.returncode == 0 and "submission: 100%" in loud.stderr, loud.stderr
    quiet = tool(repo, "make_submission", *args, str(tmp_path / "b.txt"), "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and len(quiet.stdout.splitlines()) == 1
    assert quiet.stdout.startswith("wrote %s: 120 lines" % (tmp_path / "b.txt"))
    assert (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text()


def test_evaluate_out_that_is_a_file_is_refused_before_inference(repo, trained, tmp_path):
    (tmp_path / "taken").write_text("mine")
    out = tool(repo, "evaluate", "--deploy", trained["deploy"], "--weights", trained["w150"],
               *lmdb_args(trained, "val"), "--out", str(tmp_path / "taken"), "--quiet")
    assert out.returncode == 1 and "Traceback" not in out.stderr and out.stdout == ""
    assert out.stderr.strip() == "evaluate.py: error: --out %s: a file, expected a folder for per_class_center.csv " \
                                 "and eval_center.json" % (tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "mine"


def test_the_tools_default_to_the_lmdbs_the_model_was_trained_with(repo, trained, tmp_path):
    """Without --lmdb, evaluate, visualize and make_submission read the val (test) LMDB named by the
    train_val beside the deploy file, not the repo's data/lmdb (the newcomer's sample-data run)."""
    with_flags = tool(repo, "evaluate", "--deploy", trained["deploy"], "--weights", trained["w150"],
                      *lmdb_args(trained), "--quiet", "--out", str(tmp_path / "a"))
    without = tool(repo, "evaluate", "--deploy", trained["deploy"], "--weights", trained["w150"], "--quiet",
                   "--out", str(tmp_path / "b"))
    assert without.returncode == 0, without.stderr
    def accuracies(out):
        return out.stdout.splitlines()[0].split(": top-1")[1].split("(")[0]
    assert accuracies(without) == accuracies(with_flags)
    assert os.path.join(trained["lmdb"], "val_lmdb") in without.stdout.splitlines()[0]
    sub = tool(repo, "make_submission", "--model", trained["deploy"], trained["w150"], "--out",
               str(tmp_path / "s.txt"), "--quiet")
    assert sub.returncode == 0 and "120 lines" in sub.stdout, sub.stderr
    pic = tool(repo, "visualize", "--deploy", trained["deploy"], "--weights", trained["w150"], "--out",
               str(tmp_path / "v"))
    assert pic.returncode == 0, pic.stderr
    # A model away from its run dir, and no data/lmdb: one line naming the flag.
    os.makedirs(tmp_path / "m")
    shutil.copy(trained["deploy"], tmp_path / "m")
    alone = tool(repo, "evaluate", "--deploy", str(tmp_path / "m" / "deploy.prototxt"), "--weights", trained["w150"])
    if not os.path.isdir(os.path.join(repo, "data", "lmdb", "val_lmdb")):
        assert alone.returncode == 1 and alone.stderr.strip() == (
            "evaluate.py: error: %s: no such LMDB; give --lmdb (make_lmdb.py's val_lmdb)"
            % os.path.join(repo, "data", "lmdb", "val_lmdb"))
