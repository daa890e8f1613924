"""tools/make_lmdb.py: exact Datums, orders, mean, and bad input (real LMDB, real Caffe)."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from tinycaffe import caffe_env, data, sample_data

TOOL = "tools/make_lmdb.py"


def run_tool(repo, *args, **kw):
    return subprocess.run([sys.executable, TOOL, *args, "--quiet"], cwd=repo, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Sample layout (4 classes, 12 test images so test_10 sorts after test_9 numerically)
    plus the odd files of the real release: a CMYK JPEG and one of another size."""
    root = str(tmp_path_factory.mktemp("ds") / "tiny-imagenet-200")
    sample_data.generate(root, classes=4, train=12, val=3, test=3, seed=3)
    wnid = sorted(open(os.path.join(root, "wnids.txt")).read().split())[1]
    cmyk = os.path.join(root, "train", wnid, "images", "%s_2.JPEG" % wnid)
    Image.open(cmyk).convert("CMYK").save(cmyk, "JPEG", quality=95)
    odd = os.path.join(root, "val", "images", "val_4.JPEG")
    Image.open(odd).convert("RGB").resize((80, 70)).save(odd, "JPEG", quality=95)
    return root


@pytest.fixture(scope="module")
def built(dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lmdb") / "lmdb")
    manifest = data.make_lmdbs(dataset, out, workers=2, seed=0)
    return out, manifest


def records(path):
    return list(data.iter_lmdb(path))


def pillow_bgr_chw(path, size=64):
    rgb = Image.open(path).convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(rgb)[:, :, ::-1].transpose(2, 0, 1)


def test_outputs_and_counts(built):
    out, manifest = built
    assert sorted(os.listdir(out)) == ["labels.txt", "manifest.json", "mean.binaryproto",
                                       "test_lmdb", "train_lmdb", "val_lmdb"]
    assert {s: data.lmdb_count(os.path.join(out, s + "_lmdb")) for s in ("train", "val", "test")} == \
        {"train": 48, "val": 12, "test": 12}
    on_disk = json.load(open(os.path.join(out, "manifest.json")))
    assert on_disk["splits"]["train"]["count"] == 48 and on_disk["num_classes"] == 4
    assert on_disk["splits"]["train"]["non_rgb_modes"].get("CMYK") == 1
    assert on_disk["splits"]["train"]["non_rgb_modes"].get("L", 0) >= 1
    assert on_disk["splits"]["val"]["resized"] == 1
    assert set(on_disk["splits"]["train"]["per_class"].values()) == {12}
    assert len(on_disk["source_fingerprint"]) == 64 and on_disk["seed"] == 0
    assert on_disk["tinycaffe_version"] and on_disk["images_per_second"] > 0


def test_labels_follow_sorted_wnids_with_words(built, dataset):
    out, _ = built
    wnids = open(os.path.join(dataset, "wnids.txt")).read().split()
    labels = data.read_labels(os.path.join(out, "labels.txt"))
    assert [w for w, _ in labels] == sorted(wnids) != wnids
    words = dict(line.rstrip("\n").split("\t") for line in open(os.path.join(dataset, "words.txt")))
    assert all(text == words[w] for w, text in labels)


def test_every_val_record_has_its_annotation_label(built, dataset):
    out, _ = built
    wnids = sorted(open(os.path.join(dataset, "wnids.txt")).read().split())
    rows = [line.split("\t") for line in open(os.path.join(dataset, "val", "val_annotations.txt"))]
    recs = records(os.path.join(out, "val_lmdb"))
    assert [k for k, _ in recs] == ["%08d_%s" % (i, r[0]) for i, r in enumerate(rows)]
    assert [d.label for _, d in recs] == [wnids.index(r[1]) for r in rows]


def test_datums_are_raw_bgr_chw_equal_to_pillow(built, dataset):
    out, _ = built
    recs = dict(records(os.path.join(out, "val_lmdb")))
    for i in (0, 1, 4, 7):  # val_1 is grayscale, val_4 was 80x70
        d = recs["%08d_val_%d.JPEG" % (i, i)]
        assert (d.channels, d.height, d.width, d.encoded) == (3, 64, 64, False)
        got = np.frombuffer(d.data, np.uint8).reshape(3, 64, 64)
        expected = pillow_bgr_chw(os.path.join(dataset, "val", "images", "val_%d.JPEG" % i))
        np.testing.assert_array_equal(got, expected)
    gray = np.frombuffer(recs["00000001_val_1.JPEG"].data, np.uint8).reshape(3, 64, 64)
    assert (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all()
    # Reading back gives Pillow's RGB: the channel order round-trips.
    rgb = data.datum_to_rgb(recs["00000000_val_0.JPEG"])
    np.testing.assert_array_equal(rgb, np.asarray(Image.open(os.path.join(dataset, "val/images/val_0.JPEG")).convert("RGB")))


def test_cmyk_train_image_becomes_rgb(built, dataset):
    out, _ = built
    recs = {k.split("_", 1)[1]: d for k, d in records(os.path.join(out, "train_lmdb"))}
    wnid = sorted(open(os.path.join(dataset, "wnids.txt")).read().split())[1]
    name = "%s_2.JPEG" % wnid
    got = np.frombuffer(recs[name].data, np.uint8).reshape(3, 64, 64)
    np.testing.assert_array_equal(got, pillow_bgr_chw(os.path.join(dataset, "train", wnid, "images", name)))
    assert recs[name].label == 1


def test_test_split_numeric_order_keys_carry_names(built):
    out, _ = built
    recs = records(os.path.join(out, "test_lmdb"))
    assert [k for k, _ in recs] == ["%08d_test_%d.JPEG" % (i, i) for i in range(12)]
    assert {d.label for _, d in recs} == {data.TEST_LABEL}


def test_train_shuffled_but_complete(built, dataset):
    out, _ = built
    keys = [k for k, _ in records(os.path.join(out, "train_lmdb"))]
    names = [k.split("_", 1)[1] for k in keys]
    expected = {n for w in os.listdir(os.path.join(dataset, "train"))
                for n in os.listdir(os.path.join(dataset, "train", w, "images"))}
    assert sorted(names) == sorted(expected) and len(names) == 48
    assert names != sorted(names)
    assert keys == sorted(keys) and keys[0].startswith("00000000_")
    labels = [d.label for _, d in records(os.path.join(out, "train_lmdb"))]
    assert labels[:12] != sorted(labels[:12]) or len(set(labels[:12])) > 1


def test_seed_decides_train_order(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHUNK", 8)  # six ranges: both workers write, the parent merges their sums
    a = data.make_lmdbs(dataset, str(tmp_path / "a"), workers=1, seed=0, splits=["train"])
    b = data.make_lmdbs(dataset, str(tmp_path / "b"), workers=2, seed=0, splits=["train"])
    c = data.make_lmdbs(dataset, str(tmp_path / "c"), workers=1, seed=1, splits=["train"])
    ka, kb, kc = ([k for k, _ in records(str(tmp_path / x / "train_lmdb"))] for x in "abc")
    assert ka == kb != kc
    assert a["source_fingerprint"] == b["source_fingerprint"] == c["source_fingerprint"]
    # the mean and the colour PCA are sums of exact integers: the same whatever the workers and order
    assert a["mean_bgr"] == b["mean_bgr"] == c["mean_bgr"] and a["pca_bgr"] == b["pca_bgr"] == c["pca_bgr"]


@pytest.mark.parametrize("images, side", [(0, 64), (1, 64), (2, 64), (3, 64), (64, 64), (5, 100), (9, 16), (2, 200)])
def test_pixel_stats_are_the_exact_sums_over_every_pixel(images, side):
    """The workers' batched sums (blocks of whole images, DOT_BLOCK pixels) equal a float64
    sum of x x^T image by image, bit for bit, for counts and sizes on both sides of a block."""
    rng = np.random.default_rng(images * 1000 + side)
    planes = rng.integers(0, 256, (images, 3 * side * side), dtype=np.uint8)
    planes[:, :side] = 255  # the largest products, so a lost or doubled term shows
    pixel_sum, products = data.pixel_stats(planes)
    expected = np.zeros((3, 3))
    for image in planes:
        channels = image.reshape(3, -1).astype(np.float64)
        expected += channels @ channels.T
    np.testing.assert_array_equal(products, expected)
    np.testing.assert_array_equal(pixel_sum, planes.astype(np.uint64).sum(0))
    assert pixel_sum.dtype == np.uint32
    assert data.pixel_stats(planes, products=False)[1] is None


def test_mean_matches_caffe_compute_image_mean(built, tmp_path):
    out, manifest = built
    tool = os.path.join(os.path.dirname(caffe_env.caffe_binary()), "compute_image_mean")
    theirs = str(tmp_path / "caffe_mean.binaryproto")
    run = subprocess.run([tool, "-backend", "lmdb", os.path.join(out, "train_lmdb"), theirs],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-1000:]
    ours = data.read_mean(os.path.join(out, "mean.binaryproto"))
    caffe_mean = data.read_mean(theirs)
    assert ours.shape == caffe_mean.shape == (3, 64, 64)
    np.testing.assert_allclose(ours, caffe_mean, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(manifest["mean_bgr"], caffe_mean.reshape(3, -1).mean(1), atol=1e-3)


def test_caffe_data_layer_reads_lmdb_with_crop(built, caffe, tmp_path):
    out, _ = built
    from caffe import layers as L, params as P
    n = caffe.NetSpec()
    n.data, n.label = L.Data(source=os.path.join(out, "val_lmdb"), backend=P.Data.LMDB, batch_size=5, ntop=2,
                             transform_param=dict(crop_size=60, mean_file=os.path.join(out, "mean.binaryproto")))
    path = tmp_path / "data.prototxt"
    path.write_text(str(n.to_proto()))
    net = caffe.Net(str(path), caffe.TEST)
    net.forward()
    assert net.blobs["data"].data.shape == (5, 3, 60, 60)
    expected = [d.label for _, d in records(os.path.join(out, "val_lmdb"))][:5]
    assert net.blobs["label"].data.astype(int).tolist() == expected
    # Center crop minus the mean, exactly: Caffe reads our bytes as we meant them.
    recs = records(os.path.join(out, "val_lmdb"))
    raw = np.frombuffer(recs[0][1].data, np.uint8).reshape(3, 64, 64).astype(np.float32)
    mean = data.read_mean(os.path.join(out, "mean.binaryproto"))
    np.testing.assert_allclose(net.blobs["data"].data[0], (raw - mean)[:, 2:62, 2:62], atol=1e-3)


def test_map_grows_instead_of_map_full(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "INITIAL_MAP_SIZE", 32 << 10)
    data.make_lmdbs(dataset, str(tmp_path / "out"), workers=1, splits=["train"])
    assert data.lmdb_count(str(tmp_path / "out" / "train_lmdb")) == 48


# ---------------------------------------------------------------- bad input
def copy_dataset(src, tmp_path):
    dst = str(tmp_path / "tiny-imagenet-200")
    shutil.copytree(src, dst)
    return dst


def edit_line(path, lineno, new):
    lines = open(path).read().splitlines()
    lines[lineno - 1] = new
    open(path, "w").write("\n".join(lines) + "\n")


@pytest.mark.parametrize("remove, needle", [
    ("wnids.txt", "wnids.txt: missing"),
    ("val/val_annotations.txt", "val_annotations.txt: missing"),
    ("test/images", "test/images: missing directory"),
])
def test_missing_parts_named(repo, dataset, tmp_path, remove, needle):
    ds = copy_dataset(dataset, tmp_path)
    target = os.path.join(ds, remove)
    shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    out = run_tool(repo, ds, str(tmp_path / "out"))
    assert out.returncode == 1 and needle in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("line, needle", [
    ("val_0.JPEG\tn99999999\t0\t0\t5\t5", "val_annotations.txt:1: unknown wnid n99999999"),
    ("val_0.JPEG\tWNID\t0\t0", "val_annotations.txt:1: 4 columns, expected 6"),
    ("../val_0.JPEG\tWNID\t0\t0\t5\t5", "val_annotations.txt:1: bad file name '../val_0.JPEG'"),
    ("sub/val_0.JPEG\tWNID\t0\t0\t5\t5", "val_annotations.txt:1: bad file name 'sub/val_0.JPEG'"),
    ("val_999.JPEG\tWNID\t0\t0\t5\t5", "val_annotations.txt:1: val_999.JPEG does not exist"),
])
def test_bad_annotation_lines_named_with_line(repo, dataset, tmp_path, line, needle):
    ds = copy_dataset(dataset, tmp_path)
    wnid = open(os.path.join(ds, "wnids.txt")).readline().strip()
    edit_line(os.path.join(ds, "val", "val_annotations.txt"), 1, line.replace("WNID", wnid))
    out = run_tool(repo, ds, str(tmp_path / "out"))
    assert out.returncode == 1 and needle in out.stderr, out.stderr
    assert not os.path.exists(tmp_path / "out")


def truncate_one(ds):
    wnid = sorted(os.listdir(os.path.join(ds, "train")))[0]
    bad = os.path.join(ds, "train", wnid, "images", "%s_5.JPEG" % wnid)
    blob = open(bad, "rb").read()
    open(bad, "wb").write(blob[: len(blob) // 3])
    return bad


def test_corrupt_image_stops_naming_file(repo, dataset, tmp_path):
    ds = copy_dataset(dataset, tmp_path)
    bad = truncate_one(ds)
    out = run_tool(repo, ds, str(tmp_path / "out"))
    assert out.returncode == 1 and bad in out.stderr and "cannot decode" in out.stderr
    assert not os.path.exists(tmp_path / "out")
    assert [p for p in os.listdir(tmp_path) if p.startswith(".out")] == []


def test_skip_bad_lists_the_file(repo, dataset, tmp_path):
    ds = copy_dataset(dataset, tmp_path)
    bad = truncate_one(ds)
    out = run_tool(repo, ds, str(tmp_path / "out"), "--skip-bad")
    assert out.returncode == 0, out.stderr
    assert "1 skipped" in out.stdout and bad in out.stdout
    manifest = json.load(open(tmp_path / "out" / "manifest.json"))
    assert [s["file"] for s in manifest["skipped"]] == [bad]
    assert manifest["splits"]["train"]["count"] == 47 == data.lmdb_count(str(tmp_path / "out" / "train_lmdb"))
    keys = [k for k, _ in records(str(tmp_path / "out" / "train_lmdb"))]
    positions = [int(k.split("_", 1)[0]) for k in keys]
    # Keys are planned before decoding: the bad image leaves one gap, nothing moves.
    missing = sorted(set(range(48)) - set(positions))
    assert positions == sorted(positions) and len(missing) == 1
    assert os.path.basename(bad) not in [k.split("_", 1)[1] for k in keys]


def test_existing_out_dir_refused_untouched_and_force_replaces(repo, dataset, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "precious.txt").write_text("keep")
    out = run_tool(repo, dataset, str(out_dir))
    assert out.returncode == 1 and "exists; use --force" in out.stderr
    assert os.listdir(out_dir) == ["precious.txt"]
    # --force with a failing run keeps the old tree intact ...
    ds = copy_dataset(dataset, tmp_path)
    truncate_one(ds)
    out = run_tool(repo, ds, str(out_dir), "--force")
    assert out.returncode == 1 and os.listdir(out_dir) == ["precious.txt"]
    # ... and a good run replaces it only when complete.
    out = run_tool(repo, dataset, str(out_dir), "--force", "--splits", "val")
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(out_dir)) == ["labels.txt", "manifest.json", "val_lmdb"]


def test_bad_splits_and_workers_list_valid_choices(repo, dataset, tmp_path):
    out = run_tool(repo, dataset, str(tmp_path / "o"), "--splits", "train,dev")
    assert out.returncode == 1 and "unknown dev (valid: train,val,test)" in out.stderr
    out = run_tool(repo, dataset, str(tmp_path / "o"), "--workers", "0")
    assert out.returncode == 2 and "--workers must be >= 1" in out.stderr


def test_kill_9_mid_write_leaves_nothing_at_out_dir(repo, tmp_path):
    ds = str(tmp_path / "big")
    sample_data.generate(ds, classes=10, train=300, val=5, test=5, seed=1)
    out_dir = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, TOOL, ds, str(out_dir), "--quiet", "--workers", "1"], cwd=repo,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    temp = None
    while time.time() < deadline and temp is None:
        temps = [p for p in os.listdir(tmp_path) if p.startswith(".out.tmp-")]
        if temps and os.path.exists(tmp_path / temps[0] / "train_lmdb" / "data.mdb"):
            temp = temps[0]
        time.sleep(0.02)
    assert temp, "the converter never started writing"
    time.sleep(0.05)  # mid-write: 3,000 train images take seconds with one worker
    assert proc.poll() is None, "the converter finished before it could be killed mid-write"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out_dir.exists()
    # The next run removes the dead run's temp dir and completes.
    done = run_tool(repo, ds, str(out_dir), "--splits", "val")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / temp).exists() and (out_dir / "val_lmdb").is_dir()


# ---------------------------------------------------------------- get_tiny_imagenet.sh, lmdb_info.py
def test_get_tiny_imagenet_from_file_url(repo, dataset, tmp_path):
    import zipfile
    zpath = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for dirpath, _, files in os.walk(dataset):
            for f in files:
                full = os.path.join(dirpath, f)
                z.write(full, os.path.join("tiny-imagenet-200", os.path.relpath(full, dataset)))
    dest = tmp_path / "dest"
    env = dict(os.environ, TINY_IMAGENET_URL=zpath.as_uri(), TINY_IMAGENET_MD5="skip")
    out = subprocess.run(["bash", "scripts/get_tiny_imagenet.sh", str(dest)], cwd=repo, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "next:" in out.stdout and "make_lmdb.py" in out.stdout
    assert sorted(os.listdir(dest / "tiny-imagenet-200")) == ["test", "train", "val", "wnids.txt", "words.txt"]
    # A wrong checksum is refused, naming both sums.
    shutil.rmtree(dest / "tiny-imagenet-200")
    env["TINY_IMAGENET_MD5"] = "0" * 32
    out = subprocess.run(["bash", "scripts/get_tiny_imagenet.sh", str(dest)], cwd=repo, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 1 and "expected " + "0" * 32 in out.stderr
    assert not (dest / "tiny-imagenet-200").exists()


def test_get_tiny_imagenet_offline_says_where_the_zip_goes(repo, tmp_path):
    env = dict(os.environ, TINY_IMAGENET_URL="http://127.0.0.1:9/tiny-imagenet-200.zip")  # nothing listens
    out = subprocess.run(["bash", "scripts/get_tiny_imagenet.sh", str(tmp_path)], cwd=repo, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert "Put tiny-imagenet-200.zip at %s/tiny-imagenet-200.zip" % tmp_path in last and "TINY_IMAGENET_URL" in last
    assert not os.listdir(tmp_path)  # no partial download left


def test_lmdb_info_prints_and_draws(repo, built, tmp_path):
    out, _ = built
    sheet = tmp_path / "sheet.png"
    run = subprocess.run([sys.executable, "tools/lmdb_info.py", os.path.join(out, "val_lmdb"), "--sheet", str(sheet),
                          "--n", "10"], cwd=repo, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "12 records" in run.stdout and "00000000_val_0.JPEG" in run.stdout
    assert "channels=3 height=64 width=64 encoded=False" in run.stdout
    with Image.open(sheet) as im:
        assert im.size == (8 * 66, 2 * (64 + 12 + 2))
        # The first tile is val_0 in RGB, pixel for pixel.
        tile = np.asarray(im.convert("RGB"))[:64, :64]
    recs = records(os.path.join(out, "val_lmdb"))
    np.testing.assert_array_equal(tile, data.datum_to_rgb(recs[0][1]))


def test_manifest_pca_basis_is_the_train_pixels_colour_covariance(built):
    """pca_bgr (the PCA-lighting basis gen_prototxt --augment colour|full writes into the nets):
    the eigen-decomposition of the covariance of every train pixel's (B, G, R), from the LMDB."""
    out, manifest = built
    pixels = np.concatenate([np.frombuffer(d.data, np.uint8).reshape(3, -1)
                             for _, d in data.iter_lmdb(os.path.join(out, "train_lmdb"))], axis=1).astype(np.float64)
    covariance = np.cov(pixels, bias=True)
    basis = manifest["pca_bgr"]
    vectors, stds = np.array(basis["eigvec"]), np.array(basis["eigval"])
    assert basis["pixels"] == pixels.shape[1] == 48 * 64 * 64
    assert list(stds) == sorted(stds, reverse=True) and stds.min() >= 0
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(3), atol=1e-5)  # orthonormal columns
    # covariance = V diag(std^2) V^T, to the manifest's 6 decimals
    np.testing.assert_allclose(vectors @ np.diag(stds ** 2) @ vectors.T, covariance, rtol=1e-4, atol=1e-2)
    assert vectors[:, 0].sum() > 0  # the first axis (brightness, for natural images) points towards brighter
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["pca_bgr"] == basis


def test_lmdb_info_on_an_empty_lmdb_is_one_line(repo, tmp_path):
    import lmdb
    lmdb.open(str(tmp_path / "empty_lmdb"), map_size=1 << 20).close()
    run = subprocess.run([sys.executable, "tools/lmdb_info.py", str(tmp_path / "empty_lmdb")], cwd=repo,
                         capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr and run.stdout == ""
    assert run.stderr.strip() == "lmdb_info.py: error: %s is empty (no records): make_lmdb.py writes every split it " \
                                 "lists" % (tmp_path / "empty_lmdb")


# ---------------------------------------------------------------- the plain-JPEG fast path
def _noise_image(mode, size=(64, 64), seed=0):
    rng = np.random.default_rng(seed)
    bands = {"L": 1, "RGB": 3, "CMYK": 4}[mode]
    # smooth noise, so the JPEG is a realistic photo-like stream and not all high frequency
    small = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, bands), dtype=np.uint8)
    img = Image.fromarray(small.squeeze() if bands == 1 else small, "L" if bands == 1 else None)
    img = img.convert(mode) if mode == "CMYK" else img
    return img.resize(size, Image.Resampling.BILINEAR)


def _jpeg_bytes(img, **save):
    buf = io.BytesIO()
    img.save(buf, "JPEG", **save)
    return buf.getvalue()


def _image_open_rgb(raw):
    with Image.open(io.BytesIO(raw)) as im:
        return np.asarray(im.convert("RGB"))


def _exif_bytes():
    exif = Image.Exif()
    exif[0x010E] = "tinycaffe"  # ImageDescription
    return exif.tobytes()


PLAIN_JPEGS = {
    "baseline 4:2:0": ("RGB", {}),
    "4:4:4": ("RGB", {"subsampling": 0, "quality": 95}),
    "4:2:2": ("RGB", {"subsampling": 1}),
    "progressive": ("RGB", {"progressive": True}),
    "optimized Huffman": ("RGB", {"optimize": True}),
    "restart markers": ("RGB", {"restart_marker_blocks": 3}),
    "EXIF, ICC and a comment": ("RGB", {"exif": _exif_bytes(), "icc_profile": b"\x00" * 300,
                                        "comment": b"tinycaffe"}),
    "grayscale": ("L", {}),
    "quality 100": ("RGB", {"quality": 100}),
}


@pytest.mark.parametrize("kind", sorted(PLAIN_JPEGS))
def test_plain_jpeg_fast_path_gives_image_open_pixels(kind):
    """Plain 64x64 JPEGs go straight to Pillow's JPEG decoder (no Python header parse) and give
    exactly the pixels Image.open gives, for every encoder setting the release's files could have."""
    mode, save = PLAIN_JPEGS[kind]
    raw = _jpeg_bytes(_noise_image(mode), **save)
    assert data.jpeg_frame(raw) == (64, 64, 1 if mode == "L" else 3)
    assert data._decode_plain_jpeg(raw, 64) is not None  # the fast path is the one taken
    pixels, source_mode, resized = data.read_rgb("x.JPEG", 64, raw)
    np.testing.assert_array_equal(pixels, _image_open_rgb(raw))
    assert (source_mode, resized) == (mode, False)


def _with_fill_byte(raw):
    return raw[:2] + b"\xff" + raw[2:]  # a fill byte before the first marker: legal, unusual


def _with_second_frame(raw):
    sof = raw.index(b"\xff\xc0")
    length = int.from_bytes(raw[sof + 2:sof + 4], "big")
    return raw[:sof] + raw[sof:sof + 2 + length] + raw[sof:]


def _with_segment(raw, marker, payload):
    """raw with one more segment right after SOI."""
    return raw[:2] + bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload + raw[2:]


IRREGULAR = {
    "another size (resized)": lambda: _jpeg_bytes(_noise_image("RGB", (80, 70))),
    "CMYK": lambda: _jpeg_bytes(_noise_image("CMYK")),
    "PNG named .JPEG": lambda: (lambda b: (_noise_image("RGB").save(b, "PNG"), b.getvalue())[1])(io.BytesIO()),
    "fill byte before a marker": lambda: _with_fill_byte(_jpeg_bytes(_noise_image("RGB"))),
    "an Adobe segment": lambda: _with_segment(_jpeg_bytes(_noise_image("RGB")), 0xEE,
                                              b"Adobe\x00\x64\x00\x00\x00\x00\x01"),
    "an XMP segment": lambda: _with_segment(_jpeg_bytes(_noise_image("RGB")), 0xE1,
                                            b"http://ns.adobe.com/xap/1.0/\x00<x/>"),
}


@pytest.mark.parametrize("kind", sorted(IRREGULAR))
def test_irregular_images_go_through_image_open(kind):
    raw = IRREGULAR[kind]()
    assert data._decode_plain_jpeg(raw, 64) is None
    pixels, _, resized = data.read_rgb("x.JPEG", 64, raw)
    expected = _image_open_rgb(raw)
    if resized:
        with Image.open(io.BytesIO(raw)) as im:
            expected = np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(pixels, expected)
    assert resized == (kind == "another size (resized)")


@pytest.mark.parametrize("cut", ["header", "scan"])
def test_cut_off_jpeg_fails_with_image_opens_message(cut):
    raw = _jpeg_bytes(_noise_image("RGB"))
    raw = raw[:raw.index(b"\xff\xda") - 3] if cut == "header" else raw[:len(raw) // 2]
    with pytest.raises(Exception) as theirs:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
    with pytest.raises(data.BadImage) as ours:
        data.read_rgb("cut.JPEG", 64, raw)
    assert str(ours.value) == "cut.JPEG: cannot decode (%s)" % theirs.value


def test_jpeg_frame_refuses_what_libjpeg_might_read_otherwise():
    raw = _jpeg_bytes(_noise_image("RGB"))
    assert data.jpeg_frame(raw) == (64, 64, 3)
    assert data.jpeg_frame(_with_second_frame(raw)) is None
    assert data.jpeg_frame(_with_fill_byte(raw)) is None
    assert data.jpeg_frame(raw[:raw.index(b"\xff\xc0") + 6]) is None  # frame header cut off
    sof = raw.index(b"\xff\xc0")
    assert data.jpeg_frame(raw[:sof + 4] + b"\x0c" + raw[sof + 5:]) is None  # 12-bit samples
    assert data.jpeg_frame(raw[:sof] + b"\xff\xc9" + raw[sof + 2:]) is None  # arithmetic coding
    assert data.jpeg_frame(b"\x89PNG\r\n\x1a\n" + raw) is None


OPENCV_TOOLS = os.path.join(caffe_env.tinycaffe_home(), "caffe-1.0-cpu-opencv", "bin", "convert_imageset")


@pytest.mark.skipif(not os.access(OPENCV_TOOLS, os.X_OK),
                    reason="no OpenCV build of Caffe's tools (scripts/install_caffe.sh --opencv-tools)")
def test_datums_equal_caffe_convert_imageset(built, dataset, tmp_path):
    """bench_make_lmdb's anchor writes the same pixels: Caffe's own convert_imageset (OpenCV's
    decoder) and make_lmdb (Pillow's) agree on every 64x64 image, gray ones included."""
    out, _ = built
    for split, folder in (("val", "val/images"), ("test", "test/images")):
        ours = {k.split("_", 1)[1]: d for k, d in records(os.path.join(out, split + "_lmdb"))}
        names = sorted(n for n in ours if n != "val_4.JPEG")  # val_4 is 80x70: Pillow resizes it, Caffe keeps it
        listing = tmp_path / (split + ".txt")
        listing.write_text("".join("%s %d\n" % (n, ours[n].label) for n in names))
        target = str(tmp_path / (split + "_caffe_lmdb"))
        run = subprocess.run([OPENCV_TOOLS, os.path.join(dataset, folder) + "/", str(listing), target],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-1000:]
        theirs = {k.split("_", 1)[1]: d for k, d in records(target)}
        assert sorted(theirs) == names
        assert Image.open(os.path.join(dataset, folder, split + "_1.JPEG")).mode == "L"  # a gray one is compared
        for name in names:
            a, b = ours[name], theirs[name]
            assert (a.channels, a.height, a.width, a.label) == (b.channels, b.height, b.width, b.label), name
            assert a.data == b.data, name


@pytest.mark.parametrize("marker, payload", [
    (0xE0, b"JFIF\x00\x01"),  # shorter than JFIF's 14 fixed bytes: Pillow's parser refuses it
    (0xEE, b"Adobe\x00"),  # Adobe's fixed part cut short
    (0xE2, b"ICC_PROFILE\x00"),  # no sequence number or count
])
def test_short_metadata_segments_get_image_opens_verdict(marker, payload):
    """Segments Pillow's header parser reads must be complete for the fast path; a short one goes
    through Image.open, so make_lmdb accepts or refuses the file exactly as Image.open does."""
    raw = _with_segment(_jpeg_bytes(_noise_image("RGB")), marker, payload)
    assert data.jpeg_frame(raw) is None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            expected = np.asarray(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 -- whatever Image.open raises, read_rgb must say the same
        with pytest.raises(data.BadImage) as ours:
            data.read_rgb("short.JPEG", 64, raw)
        said = "cannot identify image file 'short.JPEG'" if isinstance(exc, UnidentifiedImageError) else exc
        assert str(ours.value) == "short.JPEG: cannot decode (%s)" % said
    else:
        np.testing.assert_array_equal(data.read_rgb("short.JPEG", 64, raw)[0], expected)


def test_unidentified_file_is_named_by_its_path():
    with pytest.raises(data.BadImage) as ours:
        data.read_rgb("/data/x/val_3.JPEG", 64, b"not an image at all")
    assert str(ours.value) == "/data/x/val_3.JPEG: cannot decode (cannot identify image file '/data/x/val_3.JPEG')"


FRAME_SIZE_CHILD = """
import io, sys
import numpy as np
from PIL import Image
from tinycaffe import data
for w, h in ((80, 70), (65, 64), (64, 65), (32, 32), (128, 128), (64, 64)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (30, 60, 90)).save(buf, "JPEG")
    pixels, _, resized = data.read_rgb("x.JPEG", 64, buf.getvalue())
    assert pixels.shape == (64, 64, 3) and resized == ((w, h) != (64, 64)), (w, h)
print("ok")
"""


def test_frames_of_another_size_never_reach_the_fast_decoder(repo):
    """Pillow's JPEG decoder writes the frame's own size into the image it is given: a frame of
    another size would overrun it (a crash, or a heap silently corrupted). Run in a child
    process, so that such a regression fails this test instead of killing the suite."""
    run = subprocess.run([sys.executable, "-c", FRAME_SIZE_CHILD], cwd=repo, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-2000:])


def test_a_range_with_no_decodable_image(tmp_path):
    """Every image of a range (here the whole test split) bad: skipped and listed with --skip-bad,
    the first one named without it; the fingerprint still counts them by their size on disk."""
    root = str(tmp_path / "tiny-imagenet-200")
    sample_data.generate(root, classes=2, train=3, val=1, test=3, seed=1)
    test_dir = os.path.join(root, "test", "images")
    for name in os.listdir(test_dir):
        open(os.path.join(test_dir, name), "wb").close()
    os.remove(os.path.join(test_dir, "test_2.JPEG"))
    os.mkdir(os.path.join(test_dir, "test_2.JPEG"))  # a folder named like an image
    manifest = data.make_lmdbs(root, str(tmp_path / "out"), workers=2, skip_bad=True)
    assert manifest["splits"]["test"]["count"] == 0
    assert manifest["splits"]["test"]["skipped"] == len(os.listdir(test_dir)) == 6
    assert data.lmdb_count(str(tmp_path / "out" / "test_lmdb")) == 0
    reasons = {os.path.basename(s["file"]): s["reason"] for s in manifest["skipped"]}
    assert reasons["test_0.JPEG"] == "cannot decode (cannot identify image file '%s')" % os.path.join(
        test_dir, "test_0.JPEG")
    assert reasons["test_2.JPEG"].startswith("cannot decode ([Errno 21] Is a directory")
    wnids = data.read_wnids(root)
    listed = {"train": data.list_train(root, wnids, 0), "val": data.list_val(root, wnids), "test": data.list_test(root)}
    expected = data.source_fingerprint({split: (len(recs), sum(
        data.file_token(split, r.name, os.stat(r.path).st_size) for r in recs) % (1 << 64))
        for split, recs in listed.items()})
    assert manifest["source_fingerprint"] == expected
    with pytest.raises(data.BadImage, match="test_0.JPEG: cannot decode"):
        data.make_lmdbs(root, str(tmp_path / "out2"), workers=2, splits=["test"])
