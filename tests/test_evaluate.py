"""evaluate.py, make_submission.py (and --validate), visualize.py on a model trained in the test."""
import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image

from tinycaffe import data, evaluate, gen, sample_data, submit, visualize
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


def test_center_top1_equals_caffe_test(repo, trained):
    out = tool(repo, "evaluate", "--deploy", trained["deploy"], "--weights", trained["w150"], "--quiet",
               *lmdb_args(trained))
    assert out.returncode == 0, out.stderr
    ours = json.load(open(os.path.join(trained["run"], "eval_center.json")))
    env = dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel="0")
    caffe_test = subprocess.run([caffe_binary(), "test", "-model", trained["train_val"], "-weights", trained["w150"],
                                 "-iterations", "1"], capture_output=True, text=True, env=env)
    assert caffe_test.returncode == 0, caffe_test.stderr[-2000:]
    theirs = {m.group(1): float(m.group(2))
              for m in re.finditer(r"\] (accuracy_top[15]) = ([\d.]+)", caffe_test.stderr)}
    assert ours["images"] == 100
    assert abs(ours["top1"] - theirs["accuracy_top1"]) <= 1 / 100.0  # within one image
    assert abs(ours["top5"] - theirs["accuracy_top5"]) <= 1 / 100.0
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
    (lambda ls: ls[:5] + ls[6:], "1 test images missing, first test_5.JPEG"),
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
    assert out.returncode == 1 and "has 10 classes but" in out.stderr and "lists 6" in out.stderr
    assert not (tmp_path / "s.txt").exists()
