"""tools/make_sample_data.py writes the exact tiny-imagenet-200 layout (SPEC section 1)."""
import hashlib
import os
import subprocess
import sys

import pytest
from PIL import Image

from tinycaffe import resources, sample_data

TOOL = "tools/make_sample_data.py"


def read_lines(path):
    with open(path) as f:
        return [line.rstrip("\n") for line in f]


def tree_digest(root):
    """sha256 of every file's relative path and bytes, in sorted order."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def test_wnids_are_real_unique_and_not_sorted(small_sample):
    root, _ = small_sample
    wnids = read_lines(os.path.join(root, "wnids.txt"))
    assert len(wnids) == 4 and len(set(wnids)) == 4
    assert set(wnids) <= set(resources.reference_wnids())
    assert wnids != sorted(wnids)


def test_words_lists_more_synsets_than_classes(small_sample):
    root, _ = small_sample
    rows = [line.split("\t") for line in read_lines(os.path.join(root, "words.txt"))]
    assert all(len(r) == 2 and r[0].startswith("n") and r[1] for r in rows)
    words = dict(rows)
    assert len(words) == len(rows) > 200
    for wnid in read_lines(os.path.join(root, "wnids.txt")):
        assert wnid in words


def test_train_images_and_boxes(small_sample):
    root, _ = small_sample
    for wnid in read_lines(os.path.join(root, "wnids.txt")):
        images = sorted(os.listdir(os.path.join(root, "train", wnid, "images")))
        assert images == sorted("%s_%d.JPEG" % (wnid, i) for i in range(12))
        rows = [line.split("\t") for line in read_lines(os.path.join(root, "train", wnid, wnid + "_boxes.txt"))]
        assert [r[0] for r in rows] == ["%s_%d.JPEG" % (wnid, i) for i in range(12)]
        for r in rows:
            assert len(r) == 5
            x0, y0, x1, y1 = map(int, r[1:])
            assert 0 <= x0 <= x1 <= 63 and 0 <= y0 <= y1 <= 63


def test_val_annotations_balanced_and_in_range(small_sample):
    root, _ = small_sample
    wnids = read_lines(os.path.join(root, "wnids.txt"))
    rows = [line.split("\t") for line in read_lines(os.path.join(root, "val", "val_annotations.txt"))]
    assert [r[0] for r in rows] == ["val_%d.JPEG" % i for i in range(12)]
    assert sorted(os.listdir(os.path.join(root, "val", "images"))) == sorted(r[0] for r in rows)
    for r in rows:
        assert len(r) == 6 and r[1] in wnids
        x0, y0, x1, y1 = map(int, r[2:])
        assert 0 <= x0 <= x1 <= 63 and 0 <= y0 <= y1 <= 63
    assert sorted(r[1] for r in rows) == sorted(wnids * 3)
    assert len({r[1] for r in rows[:4]}) > 1, "val must be mixed, not grouped by class"


def test_test_split_is_unlabeled(small_sample):
    root, _ = small_sample
    assert sorted(os.listdir(os.path.join(root, "test"))) == ["images"]
    assert sorted(os.listdir(os.path.join(root, "test", "images"))) == sorted("test_%d.JPEG" % i for i in range(12))


def test_every_image_is_a_64x64_jpeg_some_grayscale(small_sample):
    root, summary = small_sample
    modes = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if name.endswith(".JPEG"):
                with Image.open(os.path.join(dirpath, name)) as im:
                    assert im.format == "JPEG" and im.size == (64, 64), name
                    modes.append(im.mode)
    assert len(modes) == 4 * (12 + 3 + 3)
    assert set(modes) == {"RGB", "L"}
    assert modes.count("L") == summary["grayscale"] >= 3  # one forced per split at least


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    args = dict(classes=3, train=4, val=2, test=2)
    sample_data.generate(str(tmp_path / "a"), seed=5, **args)
    sample_data.generate(str(tmp_path / "b"), seed=5, **args)
    sample_data.generate(str(tmp_path / "c"), seed=6, **args)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_classes_differ_in_the_pictures():
    """Same rng state, two classes: the drawn objects differ (shape/colour/texture)."""
    import random
    import numpy as np
    table = sample_data.class_table(200)
    assert len({(c.shape, c.colour, c.texture) for c in table}) == 200
    a, _ = sample_data.render(table[0], random.Random(1))
    b, _ = sample_data.render(table[1], random.Random(1))
    assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean() > 1.0


# ---------------------------------------------------------------- command line
def run_tool(repo, *args):
    return subprocess.run([sys.executable, TOOL, *args], cwd=repo, capture_output=True, text=True)


def test_cli_writes_dataset_and_summary(repo, tmp_path):
    out = run_tool(repo, str(tmp_path / "ds"), "--classes", "2", "--train", "3", "--val", "1",
                   "--test", "1", "--quiet")
    assert out.returncode == 0, out.stderr
    assert "2 classes, 6 train / 2 val / 2 test" in out.stdout
    assert len(read_lines(tmp_path / "ds" / "wnids.txt")) == 2


@pytest.mark.parametrize("args, needle", [
    (["--classes", "201"], "--classes must be in 1..200"),
    (["--classes", "0"], "--classes must be in 1..200"),
    (["--train", "-1"], "--train must be >= 0"),
])
def test_cli_bad_arguments_one_line_error(repo, tmp_path, args, needle):
    out = run_tool(repo, str(tmp_path / "ds"), "--quiet", *args)
    assert out.returncode == 2
    assert needle in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_cli_refuses_to_overwrite_a_dataset(repo, small_sample):
    root, _ = small_sample
    before = tree_digest(root)
    out = run_tool(repo, root, "--quiet")
    assert out.returncode == 2 and "already holds a dataset" in out.stderr
    assert tree_digest(root) == before


def test_cli_help_states_defaults(repo):
    out = run_tool(repo, "--help")
    assert out.returncode == 0
    assert "(default 10)" in out.stdout and "(default 100)" in out.stdout


# The quickstart's budget, 600 iterations of tiny, and the iterations that cost resnet_tiny the
# same CPU time: bench_learn.py measures its iteration at 1.65x tiny's with `caffe time` (41 vs
# 25 ms here with Caffe patch 0011; 93 vs 74 ms before it, when this was 480), so it gets 360.
DEMO_ITERATIONS = {"tiny": 600, "resnet_tiny": 360}
# Solver seeds (fillers, crops, mirrors): 200 val images make one run's margin a few images,
# and with the budget above one seed of three goes to tiny (bench_learn.py: 64.5% vs 61.5%),
# so the bar is the mean, as bench/bench_learn.py --seeds 0,1,2 reports it.
DEMO_SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def demo_top1(caffe, tmp_path_factory):
    """Mean val top-1 over DEMO_SEEDS of each CPU demo net trained on the quickstart's sample
    through Caffe's own solver."""
    import os

    from tinycaffe import data, gen
    tmp_path = tmp_path_factory.mktemp("demo")
    ds = str(tmp_path / "ds")
    sample_data.generate(ds, classes=10, train=100, val=20, test=1, seed=0)  # the quickstart's
    data.make_lmdbs(ds, str(tmp_path / "lmdb"), workers=2, splits=["train", "val"])
    results, here = {}, os.getcwd()
    try:
        os.chdir(tmp_path)  # snapshot_prefix is relative to where caffe runs
        for variant, iterations in DEMO_ITERATIONS.items():
            os.makedirs(tmp_path / "runs" / variant)
            for seed in DEMO_SEEDS:
                cfg = gen.GenConfig(out=str(tmp_path / "p"), lmdb_dir=str(tmp_path / "lmdb"), mode="cpu",
                                    num_classes=10, val_size=200, max_iter=iterations, test_interval=1000, seed=seed)
                gen.generate([variant], cfg)
                solver = caffe.get_solver(os.path.join(cfg.out, variant, "solver.prototxt"))
                solver.step(iterations)
                test_net = solver.test_nets[0]
                test_net.share_with(solver.net)  # what Caffe's own Solver::Test does before testing
                top1 = sum(float(test_net.forward()["accuracy_top1"]) for _ in range(2)) / 2  # all of val
                results[variant] = results.get(variant, 0.0) + top1 / len(DEMO_SEEDS)
    finally:
        os.chdir(here)
    return results


@pytest.mark.parametrize("variant", sorted(DEMO_ITERATIONS))  # the two CPU demo nets
def test_demo_nets_learn_the_sample_well_above_chance(demo_top1, variant):
    """The sample is learnable (and the whole data path keeps labels right): each CPU demo
    variant, trained briefly on CPU through Caffe's own solver, beats chance by far."""
    assert demo_top1[variant] >= 0.3, "%s: val top-1 %.3f after %d iterations; chance is 0.1" % (
        variant, demo_top1[variant], DEMO_ITERATIONS[variant])


def test_resnet_tiny_in_tinys_budget_reaches_tinys_top1(demo_top1):
    """Issue 14's bar: in the same CPU budget, the residual demo net learns at least as well."""
    assert demo_top1["resnet_tiny"] >= demo_top1["tiny"], demo_top1


def test_random_colour_classes_are_shape_and_texture_only(tmp_path):
    """--colours random: 40 classes at most (8 shapes x 5 textures), objects of one class in many
    colours, so colour says nothing about the class; class mode is unchanged."""
    import random
    import numpy as np
    table = sample_data.class_table(40, colours="random")
    assert len({(c.shape, c.texture) for c in table}) == 40 and {c.colour for c in table} == {"any-colour"}
    assert table[0].words == "solid any-colour circle"
    with pytest.raises(ValueError, match=r"--classes must be in 1..40 with --colours random"):
        sample_data.class_table(41, colours="random")
    hues = []
    for seed in range(12):
        img, box = sample_data.render(table[0], random.Random(seed))
        x0, y0, x1, y1 = box
        centre = np.asarray(img, np.float64)[(y0 + y1) // 2 - 1:(y0 + y1) // 2 + 2, (x0 + x1) // 2 - 1:(x0 + x1) // 2 + 2]
        r, g, b = centre.reshape(-1, 3).mean(0) / 255
        import colorsys
        hues.append(colorsys.rgb_to_hsv(r, g, b)[0])
    assert max(hues) - min(hues) > 0.4  # the same class in very different hues
    assert sample_data.class_table(10) == sample_data.class_table(10, colours="class")


def test_cli_colours_random(repo, tmp_path):
    out = run_tool(repo, str(tmp_path / "ds"), "--colours", "random", "--classes", "3", "--train", "2", "--val", "1",
                   "--test", "1", "--quiet")
    assert out.returncode == 0, out.stderr
    assert "colours random" in out.stdout
    assert "any-colour" in (tmp_path / "ds" / "words.txt").read_text()
    bad = run_tool(repo, str(tmp_path / "ds2"), "--colours", "random", "--classes", "41", "--quiet")
    assert bad.returncode == 2 and "--classes must be in 1..40 with --colours random" in bad.stderr
