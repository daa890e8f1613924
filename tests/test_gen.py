"""tools/gen_prototxt.py: the committed prototxt/ is exactly what the defaults write; flags; errors."""
import filecmp
import os
import subprocess
import sys

import pytest
from google.protobuf import text_format

from tinycaffe import nets
from tinycaffe.caffe_env import caffe_pb2

TOOL = "tools/gen_prototxt.py"


def run_tool(repo, *args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(repo, TOOL), *args], cwd=cwd or repo,
                          capture_output=True, text=True)


def test_committed_prototxt_is_what_defaults_write(repo, tmp_path):
    out = run_tool(repo, cwd=tmp_path)  # --out prototxt, relative, as in the repo
    assert out.returncode == 0, out.stderr
    committed = os.path.join(repo, "prototxt")
    assert sorted(os.listdir(committed)) == sorted(nets.VARIANTS) == sorted(os.listdir(tmp_path / "prototxt"))
    for variant in nets.VARIANTS:
        cmp = filecmp.dircmp(os.path.join(committed, variant), tmp_path / "prototxt" / variant)
        assert cmp.left_only == cmp.right_only == [], variant
        _, mismatch, errors = filecmp.cmpfiles(os.path.join(committed, variant), tmp_path / "prototxt" / variant,
                                               ["train_val.prototxt", "deploy.prototxt", "solver.prototxt"],
                                               shallow=False)
        assert mismatch == errors == [], "prototxt/%s differs from gen_prototxt.py defaults: regenerate" % variant


def test_flags_reach_the_files(repo, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("".join("n%08d thing %d\n" % (i, i) for i in range(7)))
    out = run_tool(repo, "--variants", "tiny,alexnet", "--out", str(tmp_path / "p"), "--lmdb-dir", "somewhere/lmdb",
                   "--crop", "56", "--batch-size", "9", "--schedule", "alexnet", "--solver", "nesterov",
                   "--mode", "cpu", "--max-iter", "123", "--test-interval", "40", "--labels", str(labels), "--val-size", "300")
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(tmp_path / "p")) == ["alexnet", "tiny"]
    net = caffe_pb2().NetParameter()
    text_format.Merge((tmp_path / "p" / "tiny" / "train_val.prototxt").read_text(), net)
    train, test = net.layer[0], net.layer[1]
    assert train.data_param.source == "somewhere/lmdb/train_lmdb" and train.data_param.batch_size == 9
    assert test.data_param.batch_size == 100 and train.transform_param.crop_size == 56
    assert net.layer[-3].bottom[0] == "fc_out"
    fc_out = [layer for layer in net.layer if layer.name == "fc_out"][0]
    assert fc_out.inner_product_param.num_output == 7
    s = caffe_pb2().SolverParameter()
    text_format.Merge((tmp_path / "p" / "tiny" / "solver.prototxt").read_text(), s)
    assert (s.type, s.stepsize, s.max_iter, list(s.test_iter), s.test_interval) == ("Nesterov", 100000, 123, [3], 40)
    assert s.solver_mode == caffe_pb2().SolverParameter.CPU


def test_unknown_variant_lists_valid_choices(repo, tmp_path):
    out = run_tool(repo, "--variants", "resnet", "--out", str(tmp_path / "p"))
    assert out.returncode == 1
    assert "unknown resnet (valid: all, alexnet, alexnet_small" in out.stderr
    assert not (tmp_path / "p").exists()


def test_bad_numbers_one_line_error(repo, tmp_path):
    for args, needle in ((["--crop", "65"], "--crop must be <= 64"), (["--val-size", "0"], "--val-size must be >= 1"),
                         (["--batch-size", "0"], "--batch-size must be >= 1")):
        out = run_tool(repo, *args, "--out", str(tmp_path / "p"))
        assert out.returncode == 1 and needle in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = run_tool(repo, "--solver", "adam")
    assert out.returncode == 2 and "invalid choice: 'adam'" in out.stderr


def _net(path):
    net = caffe_pb2().NetParameter()
    text_format.Merge(open(path).read(), net)
    return net


def test_augment_presets_reach_the_train_layer_only(repo, tmp_path):
    """--augment writes the preset's fields into the TRAIN Data layer (PCA lighting with the basis
    make_lmdb stored beside the LMDBs), never into TEST; the default writes today's nets."""
    from tinycaffe import augment
    lmdb_dir = tmp_path / "lmdb"
    lmdb_dir.mkdir()
    basis = {"eigval": [50.0, 10.0, 2.0], "eigvec": [[0.6, 0.7, 0.4], [0.6, 0.0, -0.8], [0.6, -0.7, 0.4]]}
    (lmdb_dir / "manifest.json").write_text('{"pca_bgr": %s}' % str(basis).replace("'", '"'))
    for preset in augment.PRESETS:
        out = run_tool(repo, "--variants", "tiny", "--out", str(tmp_path / preset), "--lmdb-dir", str(lmdb_dir),
                       "--augment", preset)
        assert out.returncode == 0, out.stderr
        text = (tmp_path / preset / "tiny" / "train_val.prototxt").read_text()
        net = _net(tmp_path / preset / "tiny" / "train_val.prototxt")
        train, test = net.layer[0].transform_param, net.layer[1].transform_param
        chosen = augment.PRESETS[preset]
        assert train.mirror == chosen["mirror"] and not test.mirror
        assert train.HasField("distort_param") == bool(chosen.get("distort"))
        assert train.HasField("lighting_param") == bool(chosen.get("lighting"))
        assert train.HasField("random_resized_crop_param") == bool(chosen.get("resized_crop"))
        assert not any(test.HasField(f) for f in augment.AUGMENT_FIELDS)
        if chosen.get("lighting"):
            assert list(train.lighting_param.eigval) == basis["eigval"]
            assert [round(v, 6) for v in train.lighting_param.eigvec] == [0.6, 0.7, 0.4, 0.6, 0.0, -0.8, 0.6, -0.7,
                                                                          0.4]
            assert "augment %s (PCA basis of %s/manifest.json)" % (preset, lmdb_dir) in text
        if chosen.get("distort"):
            assert train.distort_param.hue_delta == 18 and train.distort_param.contrast_upper == 1.5
        assert ("augment " in text) == (preset != augment.DEFAULT_PRESET)
    default = run_tool(repo, "--variants", "tiny", "--augment", "flip", cwd=tmp_path)  # --out prototxt, relative
    assert default.returncode == 0
    assert (tmp_path / "prototxt" / "tiny" / "train_val.prototxt").read_text() == \
        open(os.path.join(repo, "prototxt", "tiny", "train_val.prototxt")).read()


def test_augment_without_a_basis_uses_imagenets_and_says_so(repo, tmp_path):
    from tinycaffe import augment
    out = run_tool(repo, "--variants", "tiny", "--out", str(tmp_path / "p"), "--lmdb-dir", str(tmp_path / "none"),
                   "--augment", "full")
    assert out.returncode == 0, out.stderr
    path = tmp_path / "p" / "tiny" / "train_val.prototxt"
    assert "ImageNet: no pca_bgr in %s/manifest.json" % (tmp_path / "none") in path.read_text()
    lighting = _net(path).layer[0].transform_param.lighting_param
    assert [round(v, 4) for v in lighting.eigval] == augment.IMAGENET_PCA_BGR["eigval"]
    bad = run_tool(repo, "--augment", "color", "--out", str(tmp_path / "q"))
    assert bad.returncode == 2 and "invalid choice: 'color'" in bad.stderr and "colour" in bad.stderr


def read(path, message):
    text_format.Merge(open(path).read(), message)
    return message


def test_recipes_are_the_papers_and_say_so(repo):
    """PReLU slopes undecayed (He et al. 2015), ResNets at weight decay 1e-4 (He et al. 2016), and the
    seed variants on the paper's own numbers; each generated header names its source."""
    pb2 = caffe_pb2()
    for variant in nets.VARIANTS:
        folder = os.path.join(repo, "prototxt", variant)
        net = read(os.path.join(folder, "train_val.prototxt"), pb2.NetParameter())
        solver = read(os.path.join(folder, "solver.prototxt"), pb2.SolverParameter())
        header = open(os.path.join(folder, "solver.prototxt")).read().split("\ntest_iter")[0]
        prelus = [layer for layer in net.layer if layer.type == "PReLU"]
        assert all([(p.lr_mult, p.decay_mult) for p in layer.param] == [(1, 0)] for layer in prelus), variant
        assert ("PReLU slopes without weight decay" in header) == bool(prelus), variant
        if variant.startswith("resnet"):
            assert solver.weight_decay == pytest.approx(1e-4) and "He et al. 2016" in header, variant
        else:
            assert solver.weight_decay == pytest.approx(5e-4), variant
        assert "# recipe: base_lr %g, weight_decay %g" % (solver.base_lr, solver.weight_decay) in header
    for variant in ("alexnet", "alexnet_small", "alexnet_prelu"):  # the paper's: 0.01, /10 every 5,000
        solver = read(os.path.join(repo, "prototxt", variant, "solver.prototxt"), pb2.SolverParameter())
        assert (solver.base_lr, solver.lr_policy, solver.stepsize, solver.gamma, solver.momentum) == \
            (pytest.approx(0.01), "step", 5000, pytest.approx(0.1), pytest.approx(0.9))
    assert len([layer for layer in read(os.path.join(repo, "prototxt", "alexnet_prelu", "train_val.prototxt"),
                                        pb2.NetParameter()).layer if layer.type == "PReLU"]) == 7


def test_from_to_rewrites_every_path_for_the_new_folder(repo, tmp_path):
    out = run_tool(repo, "--from", "prototxt/tiny", "--to", str(tmp_path / "mine"), cwd=repo)
    assert out.returncode == 0, out.stderr
    pb2 = caffe_pb2()
    solver = read(tmp_path / "mine" / "solver.prototxt", pb2.SolverParameter())
    net = read(tmp_path / "mine" / "train_val.prototxt", pb2.NetParameter())
    # Outside prototxt/, paths are absolute: the copy trains from any directory.
    assert solver.net == str(tmp_path / "mine" / "train_val.prototxt")
    assert solver.snapshot_prefix == "runs/mine/mine"
    assert [layer.data_param.source for layer in net.layer[:2]] == [os.path.join(repo, "data/lmdb/train_lmdb"),
                                                                    os.path.join(repo, "data/lmdb/val_lmdb")]
    original = read(os.path.join(repo, "prototxt", "tiny", "train_val.prototxt"), pb2.NetParameter())
    assert [layer.name for layer in net.layer] == [layer.name for layer in original.layer]
    moved = run_tool(repo, "--from", os.path.join(repo, "prototxt", "tiny"), "--to", "elsewhere", cwd=str(tmp_path))
    assert moved.returncode == 0, moved.stderr
    net = read(tmp_path / "elsewhere" / "train_val.prototxt", pb2.NetParameter())
    assert net.layer[0].data_param.source == os.path.join(repo, "data/lmdb/train_lmdb")
    inside = run_tool(repo, "--from", "prototxt/tiny", "--to", "prototxt/mine_test_copy", cwd=repo)
    try:  # into prototxt/: repo-relative, like the generated files
        assert inside.returncode == 0, inside.stderr
        solver = read(os.path.join(repo, "prototxt", "mine_test_copy", "solver.prototxt"), pb2.SolverParameter())
        net = read(os.path.join(repo, "prototxt", "mine_test_copy", "train_val.prototxt"), pb2.NetParameter())
        assert solver.net == "prototxt/mine_test_copy/train_val.prototxt"
        assert net.layer[0].data_param.source == "data/lmdb/train_lmdb"
    finally:
        import shutil
        shutil.rmtree(os.path.join(repo, "prototxt", "mine_test_copy"), ignore_errors=True)
    for args, needle in ((["--from", "prototxt/tiny"], "--from and --to go together"),
                         (["--from", "prototxt/nothing", "--to", str(tmp_path / "x")], "no solver.prototxt there")):
        bad = run_tool(repo, *args)
        assert bad.returncode == 1 and needle in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "x")


def test_test_iter_and_classes_come_from_the_lmdb_dir(repo, tmp_path):
    """test_iter covers the val LMDB of --lmdb-dir exactly once and the classes are its labels.txt's,
    without --val-size or --labels; the flags still win."""
    from conftest import make_sample_lmdbs
    lmdb = make_sample_lmdbs(tmp_path, train=10, seed=3)  # 10 classes, 200 val images
    out = run_tool(repo, "--variants", "tiny", "--out", str(tmp_path / "p"), "--lmdb-dir", lmdb, "--mode", "cpu")
    assert out.returncode == 0, out.stderr
    s = caffe_pb2().SolverParameter()
    text_format.Merge((tmp_path / "p" / "tiny" / "solver.prototxt").read_text(), s)
    net = caffe_pb2().NetParameter()
    text_format.Merge((tmp_path / "p" / "tiny" / "train_val.prototxt").read_text(), net)
    test_batch = net.layer[1].data_param.batch_size
    assert s.test_iter[0] * test_batch == 200
    assert [layer for layer in net.layer if layer.name == "fc_out"][0].inner_product_param.num_output == 10
    out = run_tool(repo, "--variants", "tiny", "--out", str(tmp_path / "q"), "--lmdb-dir", lmdb, "--val-size", "300",
                   "--num-classes", "7")
    assert out.returncode == 0, out.stderr
    s = caffe_pb2().SolverParameter()
    text_format.Merge((tmp_path / "q" / "tiny" / "solver.prototxt").read_text(), s)
    assert list(s.test_iter) == [3]


def test_an_lmdb_dir_that_does_not_exist_is_said(repo, tmp_path):
    out = run_tool(repo, "--variants", "tiny", "--out", str(tmp_path / "p"), "--lmdb-dir", "data/no_such_lmdb")
    assert out.returncode == 0
    assert "note: --lmdb-dir data/no_such_lmdb does not exist (yet" in out.stderr and "200 classes" in out.stderr


def test_an_lmdb_dir_relative_to_where_one_is(repo, tmp_path):
    """From outside the repo, a relative --lmdb-dir that exists here (not under the repo root) is
    written absolute, and its val count and classes are read."""
    from conftest import make_sample_lmdbs
    make_sample_lmdbs(tmp_path, train=4, seed=1)  # tmp_path/lmdb: 10 classes, 200 val
    out = run_tool(repo, "--variants", "tiny", "--out", "p", "--lmdb-dir", "lmdb", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    net = caffe_pb2().NetParameter()
    text_format.Merge((tmp_path / "p" / "tiny" / "train_val.prototxt").read_text(), net)
    assert net.layer[0].data_param.source == str(tmp_path / "lmdb" / "train_lmdb")
    assert [layer for layer in net.layer if layer.name == "fc_out"][0].inner_product_param.num_output == 10
