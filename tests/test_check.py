"""gen_prototxt.py --check: typos, wrong bottoms, shape errors, pairs, solvers; and the tables."""
import os
import shutil
import subprocess
import sys

import pytest

from tinycaffe import check

TOOL = "tools/gen_prototxt.py"


def run_check(repo, *files):
    return subprocess.run([sys.executable, os.path.join(repo, TOOL), "--check", *map(str, files)],
                          cwd=repo, capture_output=True, text=True)


@pytest.fixture
def tiny(repo, tmp_path):
    """Copies of the committed tiny net files, to break."""
    folder = tmp_path / "tiny"
    shutil.copytree(os.path.join(repo, "prototxt", "tiny"), folder)
    return folder


def replace_once(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_committed_variants_pass(repo):
    variants = ("alexnet", "tiny", "resnet18", "resnet34", "inception_small", "resnet_tiny")
    files = [os.path.join("prototxt", v, f + ".prototxt") for v in variants for f in ("train_val", "deploy", "solver")]
    out = run_check(repo, *files)
    assert out.returncode == 0, out.stderr
    assert "18 file(s) checked, 0 problem(s)" in out.stdout
    assert out.stdout.count("same layer names and parameter shapes") == len(variants)
    assert "total: 11,281,052 parameters, 4035.5 MFLOPs per image" in out.stdout  # resnet18, TEST net
    assert "lr_policy multistep (stepvalue 10000,15000, gamma 0.1)" in out.stdout
    assert "same layer names and parameter shapes" in out.stdout
    assert "conv1" in out.stdout and "MFLOPs/img" in out.stdout


def test_misspelled_field_reports_file_line_column(repo, tiny):
    path = tiny / "train_val.prototxt"
    replace_once(path, "kernel_size: 3", "kernel_sise: 3")
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "kernel_sise" in text)
    out = run_check(repo, path)
    assert out.returncode == 1
    assert "%s:%d:5: " % (path, line) in out.stderr and 'no field named "kernel_sise"' in out.stderr


def test_wrong_bottom_is_named(repo, tiny):
    path = tiny / "train_val.prototxt"
    replace_once(path, 'bottom: "pool1"', 'bottom: "pool9"')
    out = run_check(repo, path)
    assert out.returncode == 1
    assert "Unknown bottom blob 'pool9' (layer 'conv2_1'" in out.stderr
    assert "Check failure stack trace" not in out.stderr


def test_shape_mismatch_names_the_layer(repo, tiny):
    path = tiny / "deploy.prototxt"
    replace_once(path, 'layer {\n  name: "prob"',
                 'layer {\n  name: "bad_sum"\n  type: "Eltwise"\n  bottom: "conv1_1"\n  bottom: "pool1"\n'
                 '  top: "bad_sum"\n}\nlayer {\n  name: "prob"')
    out = run_check(repo, path)
    assert out.returncode == 1
    assert "layer 'bad_sum': Check failed: bottom[0]->shape() == bottom[i]->shape()" in out.stderr


def test_pair_with_different_parameter_shapes(repo, tiny):
    replace_once(tiny / "deploy.prototxt", "num_output: 128", "num_output: 64")
    out = run_check(repo, tiny / "train_val.prototxt", tiny / "deploy.prototxt")
    assert out.returncode == 1
    assert "layer 'fc1' parameter shapes [[64, 4096], [64]] differ" in out.stderr


def test_pair_with_renamed_layer(repo, tiny):
    text = (tiny / "deploy.prototxt").read_text().replace('name: "fc_out"', 'name: "classifier"')
    (tiny / "deploy.prototxt").write_text(text)
    out = run_check(repo, tiny / "train_val.prototxt", tiny / "deploy.prototxt")
    assert out.returncode == 1
    assert "layer 'classifier' has parameters but no layer of that name" in out.stderr
    # A train-only layer is no problem (GoogLeNet's auxiliary heads); it is noted.
    assert "note: layers with parameters in %s only (not used by the deploy net): fc_out" % (tiny / "train_val.prototxt") \
        in out.stdout


def test_solver_problems(repo, tiny):
    path = tiny / "solver.prototxt"
    replace_once(path, 'type: "SGD"', 'type: "AdaGrad"')
    replace_once(path, 'net: "prototxt/tiny/train_val.prototxt"', 'net: "prototxt/tiny/nope.prototxt"')
    out = run_check(repo, path)
    assert out.returncode == 1
    assert "AdaGrad takes no momentum" in out.stderr and "nope.prototxt does not exist" in out.stderr


def test_table_counts_parameters_and_flops(caffe, repo):
    info = check.inspect_net(os.path.join(repo, "prototxt", "tiny", "deploy.prototxt"), "TEST")
    rows = {r["name"]: r for r in info["layers"]}
    assert rows["conv1_1"]["tops"] == [[1, 16, 60, 60]]
    assert rows["conv1_1"]["params"] == [[16, 3, 3, 3], [16]]
    assert rows["conv1_1"]["flops"] == 2 * 16 * 60 * 60 * 3 * 3 * 3
    assert rows["fc1"]["flops"] == 2 * 128 * 64 * 8 * 8
    assert rows["prob"]["tops"] == [[1, 200]]


def test_generated_files_read_their_data_from_the_repo_root_from_any_directory(repo, tmp_path):
    """prototxt/ files say their paths are relative to the repo root: --check from elsewhere looks there."""
    out = subprocess.run([sys.executable, os.path.join(repo, TOOL), "--check",
                          os.path.join(repo, "prototxt", "tiny", "train_val.prototxt")],
                         cwd=str(tmp_path), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    note = "source %s is not readable; images taken as 3x60x60, from the Input of %s" % (
        os.path.join(repo, "data", "lmdb", "train_lmdb"), os.path.join(repo, "prototxt", "tiny", "deploy.prototxt"))
    if os.path.isdir(os.path.join(repo, "data", "lmdb", "train_lmdb")):
        assert "not readable" not in out.stdout  # the repo's LMDB was found and read
    else:
        assert note in out.stdout


def test_augmentation_fields_are_checked_with_one_line_each(repo, tmp_path):
    """--check names a bad augmentation value (Caffe itself would stop with a CHECK and a stack
    dump at the first batch) and accepts every preset."""
    out = subprocess.run([sys.executable, os.path.join(repo, TOOL), "--variants", "tiny", "--out",
                          str(tmp_path / "p"), "--augment", "full"], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    path = tmp_path / "p" / "tiny" / "train_val.prototxt"
    good = run_check(repo, path)
    assert good.returncode == 0, good.stderr
    replace_once(path, "hue_prob: 0.5", "hue_prob: 1.5")
    replace_once(path, "min_area: 0.08", "min_area: 0")
    bad = run_check(repo, path)
    assert bad.returncode == 1
    problems = [line for line in bad.stderr.splitlines() if line.startswith("problem: ")]
    assert any("(layer 'data'): distort_param.hue_prob is 1.5, expected a probability in [0, 1]" in p
               for p in problems)
    assert any("random_resized_crop_param area is 0..1, expected 0 < min_area <= max_area <= 1" in p
               for p in problems)


def test_an_empty_net_is_a_problem(repo, tmp_path):
    """An empty file parses as an empty NetParameter: --check said "0 problem(s)" for it."""
    (tmp_path / "train_val.prototxt").write_text("# nothing here\n")
    out = run_check(repo, str(tmp_path / "train_val.prototxt"))
    assert out.returncode == 1
    assert "problem: %s: no layers (an empty or truncated file?)" % (tmp_path / "train_val.prototxt") in out.stderr
