"""Caffe patch 0010: colour and scale augmentation in the real Data layer, checked on Datums
of known content (the math, not just that it runs), plus the presets of tinycaffe/augment.py."""
import colorsys

import lmdb
import numpy as np
import pytest
from google.protobuf import json_format, text_format

from tinycaffe import augment, caffe_env

BATCH = 16


def write_lmdb(path, images):
    """images: uint8 arrays CxHxW (BGR) -> an LMDB of raw Datums, labels 0, 1, 2, ..."""
    pb2 = caffe_env.caffe_pb2()
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i, chw in enumerate(images):
            c, h, w = chw.shape
            datum = pb2.Datum(channels=c, height=h, width=w, data=np.ascontiguousarray(chw, np.uint8).tobytes(),
                              label=i, encoded=False)
            txn.put(b"%08d" % i, datum.SerializeToString())
    env.close()
    return str(path)


def batches(caffe, tmp_path, source, transform, count=1, phase="TRAIN", seed=1, batch=BATCH):
    """`count` batches of the real Data layer reading `source` with `transform` (a dict of
    transform_param fields), in `phase`, with Caffe's random seed `seed`."""
    pb2 = caffe_env.caffe_pb2()
    net = pb2.NetParameter(name="augment")
    layer = net.layer.add(name="data", type="Data", top=["data", "label"])
    layer.data_param.source = source
    layer.data_param.backend = pb2.DataParameter.LMDB
    layer.data_param.batch_size = batch
    json_format.ParseDict(transform, layer.transform_param)
    path = tmp_path / ("net_%d.prototxt" % len(list(tmp_path.glob("net_*.prototxt"))))
    path.write_text(text_format.MessageToString(net))
    caffe.set_random_seed(seed)
    model = caffe.Net(str(path), getattr(caffe, phase))
    out = []
    for _ in range(count):
        model.forward()
        out.append(model.blobs["data"].data.copy())
    return np.concatenate(out)


def random_images(n, size=8, seed=0, low=0, high=256):
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, (3, size, size), dtype=np.uint8) for _ in range(n)]


@pytest.fixture
def noise_lmdb(tmp_path):
    return write_lmdb(tmp_path / "noise_lmdb", random_images(BATCH))


def only(**fields):
    """A distort_param with these fields and every other probability 0."""
    return {"distort_param": fields}


ALL_OFF = {"distort_param": dict(brightness_prob=0, brightness_delta=32, contrast_prob=0, contrast_lower=0.5,
                                 contrast_upper=1.5, saturation_prob=0, saturation_lower=0.5, saturation_upper=1.5,
                                 hue_prob=0, hue_delta=18, random_order_prob=0),
           "lighting_param": dict(alphastd=0, eigval=[50, 5, 1], eigvec=[1, 0, 0, 0, 1, 0, 0, 0, 1])}


def test_absent_or_zero_probabilities_are_bit_exact_with_the_plain_transform(caffe, tmp_path, noise_lmdb):
    plain = dict(crop_size=6, mirror=True, mean_value=[100, 110, 120], scale=0.5)
    base = batches(caffe, tmp_path, noise_lmdb, plain, count=3)
    off = batches(caffe, tmp_path, noise_lmdb, dict(plain, **ALL_OFF), count=3)
    assert off.dtype == base.dtype and np.array_equal(off, base)  # same values and same random crops/mirrors
    assert not np.array_equal(base[:BATCH], base[BATCH:2 * BATCH])  # the crops/mirrors really are random


def test_contrast_two_doubles_every_value_clamped(caffe, tmp_path):
    images = random_images(BATCH)
    source = write_lmdb(tmp_path / "lmdb", images)
    out = batches(caffe, tmp_path, source, only(contrast_prob=1, contrast_lower=2, contrast_upper=2))
    expected = np.minimum(2.0 * np.stack(images).astype(np.float32), 255)
    assert np.array_equal(out, expected)


def test_brightness_adds_one_delta_per_image_within_the_range(caffe, tmp_path):
    images = random_images(BATCH)
    source = write_lmdb(tmp_path / "lmdb", images)
    out = batches(caffe, tmp_path, source, only(brightness_prob=1, brightness_delta=40))
    deltas = []
    for got, img in zip(out, images):
        img = img.astype(np.float32)
        shift = got - img
        inside = (got > 0) & (got < 255)
        delta = float(np.median(shift[inside]))
        assert abs(delta) <= 40
        assert np.allclose(shift[inside], delta, atol=1e-4)  # one common delta for the image
        assert np.array_equal(got, np.clip(img + delta, 0, 255)) or np.allclose(got, np.clip(img + delta, 0, 255),
                                                                                atol=1e-4)
        deltas.append(delta)
    assert len(set(np.round(deltas, 3))) > BATCH // 2  # drawn per image
    assert max(np.abs(deltas)) > 0.7 * 40  # from the whole range, not a narrower one


def test_saturation_zero_gives_grey_pixels_of_the_same_value(caffe, tmp_path):
    images = random_images(BATCH)
    source = write_lmdb(tmp_path / "lmdb", images)
    out = batches(caffe, tmp_path, source, only(saturation_prob=1, saturation_lower=0, saturation_upper=0))
    assert np.array_equal(out[:, 0], out[:, 1]) and np.array_equal(out[:, 1], out[:, 2])
    assert np.allclose(out[:, 0], np.stack(images).max(axis=1), atol=1e-3)  # V = max(B, G, R) is kept


def test_hue_delta_zero_is_the_identity(caffe, tmp_path):
    images = random_images(BATCH)
    source = write_lmdb(tmp_path / "lmdb", images)
    out = batches(caffe, tmp_path, source, only(hue_prob=1, hue_delta=0, saturation_prob=1, saturation_lower=1,
                                                saturation_upper=1))
    assert np.array_equal(out, np.stack(images).astype(np.float32))  # nothing to do: skipped, exact
    # One float step above 1: the HSV round trip itself runs, and gives the pixels back.
    nudged = only(hue_prob=1, hue_delta=0, saturation_prob=1, saturation_lower=1.0000001, saturation_upper=1.0000001)
    out = batches(caffe, tmp_path, source, nudged)
    assert not np.array_equal(out, np.stack(images).astype(np.float32))
    assert np.allclose(out, np.stack(images), atol=2e-3)


def _hsv(bgr):
    b, g, r = (float(v) / 255 for v in bgr)
    return colorsys.rgb_to_hsv(r, g, b)


def test_hue_rotates_every_colour_by_one_angle_on_opencvs_scale(caffe, tmp_path):
    """OpenCV's 8-bit hue runs 0..180: a shift of d units is 2d degrees, so 60 turns red into green.
    SSD draws d uniformly from [-hue_delta, hue_delta]; each image must show one common rotation,
    and red, green and blue pixels must land exactly where HSV puts them."""
    side = 6
    palette = [(0, 0, 255), (0, 255, 0), (255, 0, 0), (40, 200, 90), (200, 60, 30), (120, 30, 220)]
    image = np.zeros((3, side, side), np.uint8)
    for i in range(side * side):
        image[:, i // side, i % side] = palette[i % len(palette)]
    source = write_lmdb(tmp_path / "lmdb", [image] * BATCH)
    out = batches(caffe, tmp_path, source, only(hue_prob=1, hue_delta=60), count=2)
    shifts = []
    for got in out:
        red_hue = _hsv(got[:, 0, 0])[0] * 360  # pixel 0 is pure red (BGR 0, 0, 255)
        for i in range(side * side):
            src, dst = _hsv(image[:, i // side, i % side]), _hsv(got[:, i // side, i % side])
            turn = (dst[0] - src[0]) * 360 % 360
            assert min(abs(turn - red_hue % 360), 360 - abs(turn - red_hue % 360)) < 0.05
            assert dst[1] == pytest.approx(src[1], abs=1e-4) and dst[2] == pytest.approx(src[2], abs=1e-4)
        d = ((red_hue + 180) % 360 - 180) / 2  # back to OpenCV units in [-90, 90)
        assert abs(d) <= 60 + 1e-3
        r, g, b = colorsys.hsv_to_rgb((2 * d / 360) % 1, 1, 1)
        assert np.allclose(got[:, 0, 0], [b * 255, g * 255, r * 255], atol=1e-2)
        shifts.append(d)
    assert max(shifts) - min(shifts) > 30  # drawn per image, spread over the range
    # 1 unit = 2 degrees: the turns reach beyond +-80 degrees (with 1 unit = 1 degree, d would
    # stay within +-30 here; with 4 degrees, beyond 60 and fail above).
    assert max(np.abs(shifts)) > 40


def test_pca_lighting_adds_eigvec_times_alpha_eigval_per_image(caffe, tmp_path, noise_lmdb):
    images = np.stack(random_images(BATCH)).astype(np.float32)
    lighting = {"lighting_param": dict(alphastd=1, eigval=[10, 0, 0], eigvec=[1, 0, 0, 0, 1, 0, 0, 0, 1])}
    out = batches(caffe, tmp_path, noise_lmdb, lighting, count=4)
    shifts = out - np.concatenate([images] * 4)
    assert np.array_equal(shifts[:, 1:], np.zeros_like(shifts[:, 1:]))  # axes 2, 3 have eigval 0
    per_image = shifts[:, 0].reshape(len(out), -1)
    assert np.allclose(per_image, per_image[:, :1], atol=1e-4)  # one offset per image, not clamped
    assert 5 < per_image[:, 0].std() < 20  # alpha ~ N(0, 1) times eigval 10
    # The axes are eigvec's columns (rows are channels B, G, R): axis 1 = (1, 2, 3).
    columns = {"lighting_param": dict(alphastd=1, eigval=[10, 0, 0], eigvec=[1, 0, 0, 2, 0, 0, 3, 0, 0])}
    shifts = batches(caffe, tmp_path, noise_lmdb, columns)[:, :, 0, 0] - images[:, :, 0, 0]
    assert np.allclose(shifts[:, 1], 2 * shifts[:, 0], atol=1e-3) and np.allclose(shifts[:, 2], 3 * shifts[:, 0],
                                                                                 atol=1e-3)
    assert np.abs(shifts[:, 0]).max() > 1
    zero = {"lighting_param": dict(alphastd=0, eigval=[10, 0, 0], eigvec=[1, 0, 0, 0, 1, 0, 0, 0, 1])}
    assert np.array_equal(batches(caffe, tmp_path, noise_lmdb, zero), images)


def test_random_resized_crop_of_area_and_aspect_one_equals_the_crop_path(caffe, tmp_path, noise_lmdb):
    whole = {"random_resized_crop_param": dict(min_area=1, max_area=1, min_aspect=1, max_aspect=1)}
    for crop in ({}, {"crop_size": 8}):  # the Datums are 8x8: no crop, or a crop of the whole image
        plain = batches(caffe, tmp_path, noise_lmdb, dict(crop, mean_value=[3]), count=2)
        resized = batches(caffe, tmp_path, noise_lmdb, dict(crop, mean_value=[3], **whole), count=2)
        assert np.array_equal(resized, plain)


def test_random_resized_crop_resamples_bilinearly(caffe, tmp_path):
    """A horizontal ramp 4x + 10 stays a ramp: a quarter-area square of a 16x16 image blown up to
    16x16 has slope 2 between pixel centres (clamped at the rectangle's edges), rows all equal."""
    ramp = np.broadcast_to((4 * np.arange(16) + 10).astype(np.uint8), (3, 16, 16)).copy()
    source = write_lmdb(tmp_path / "lmdb", [ramp] * BATCH)
    quarter = {"random_resized_crop_param": dict(min_area=0.25, max_area=0.25, min_aspect=1, max_aspect=1)}
    out = batches(caffe, tmp_path, source, quarter)
    assert np.array_equal(out, np.broadcast_to(out[:, :, :1, :], out.shape))  # rows equal
    steps = np.diff(out[:, 0, 0, :], axis=1)
    assert np.allclose(steps[:, 1:-1], 2.0, atol=1e-4)  # interior: half a source pixel per output pixel
    assert np.allclose(steps[:, [0, -1]], 1.0, atol=1e-4)  # first/last quarter pixel clamped to the edge
    lefts = (out[:, 0, 0, 0] - 10) / 4  # the rectangle's left column, random per image
    assert np.allclose(lefts, np.round(lefts)) and lefts.min() >= 0 and lefts.max() <= 8
    assert len(set(lefts.tolist())) > 1


def test_random_resized_crop_resamples_the_mean_file_with_the_image(caffe, tmp_path):
    """Image = mean: whatever rectangle, mirror and resampling, the result is exactly 0."""
    from tinycaffe import data
    images = random_images(BATCH, size=16)
    source = write_lmdb(tmp_path / "lmdb", [images[0]] * BATCH)
    mean = tmp_path / "mean.binaryproto"
    mean.write_bytes(data.mean_blob_bytes(images[0].astype(np.float64)))
    crop = {"crop_size": 12, "mirror": True, "mean_file": str(mean),
            "random_resized_crop_param": dict(min_area=0.2, max_area=0.9)}
    out = batches(caffe, tmp_path, source, crop)
    assert out.shape == (BATCH, 3, 12, 12) and np.abs(out).max() < 1e-4


def test_random_resized_crop_falls_back_to_the_centred_rectangle(caffe, tmp_path):
    """Aspect 2 cannot fit at area 1 of a square: after the attempts, torchvision's fallback, the
    centred full-width band of height 8 / 2 = 4 (rows 2..5), the same for every image."""
    rows = np.broadcast_to((10 * np.arange(8) + 5).astype(np.uint8)[:, None], (3, 8, 8)).copy()
    source = write_lmdb(tmp_path / "lmdb", [rows] * BATCH)
    band = {"random_resized_crop_param": dict(min_area=1, max_area=1, min_aspect=2, max_aspect=2)}
    out = batches(caffe, tmp_path, source, band)
    assert np.array_equal(out, np.broadcast_to(out[:1], out.shape))
    column = out[0, 0, :, 0]
    assert column[0] == 25 and column[-1] == 55  # rows 2 and 5 of the image (clamped edges)
    assert np.allclose(np.diff(column)[1:-1], 5.0)  # 4 rows stretched to 8: half a row per pixel


def test_inactive_distortion_leaves_grey_datums_alone(caffe, tmp_path):
    """distort_param with every probability 0 cannot change a pixel, so it must not demand 3
    channels either (one-channel Datums beside a resized crop)."""
    grey = [np.full((1, 8, 8), 7 * i, np.uint8) for i in range(BATCH)]
    source = write_lmdb(tmp_path / "lmdb", grey)
    transform = {"distort_param": dict(brightness_prob=0), "random_resized_crop_param": dict(min_area=0.5)}
    out = batches(caffe, tmp_path, source, transform)
    assert out.shape == (BATCH, 1, 8, 8)
    assert np.array_equal(out[:, 0, 0, 0], 7.0 * np.arange(BATCH))


def test_test_phase_is_untouched(caffe, tmp_path, noise_lmdb):
    plain = dict(crop_size=6, mirror=True, mean_value=[100, 110, 120])  # Caffe mirrors in TEST too, if asked
    everything = dict(plain, **augment.train_transform("full"))
    everything["distort_param"].update(brightness_prob=1, contrast_prob=1, hue_prob=1, saturation_prob=1,
                                       random_order_prob=1)
    assert np.array_equal(batches(caffe, tmp_path, noise_lmdb, everything, phase="TEST", count=2),
                          batches(caffe, tmp_path, noise_lmdb, plain, phase="TEST", count=2))
    assert not np.array_equal(batches(caffe, tmp_path, noise_lmdb, everything, count=2),
                              batches(caffe, tmp_path, noise_lmdb, plain, count=2))


def test_same_random_seed_same_batches(caffe, tmp_path, noise_lmdb):
    full = dict(crop_size=6, mean_value=[100, 110, 120], **augment.train_transform("full"))
    first = batches(caffe, tmp_path, noise_lmdb, full, count=3, seed=5)
    again = batches(caffe, tmp_path, noise_lmdb, full, count=3, seed=5)
    other = batches(caffe, tmp_path, noise_lmdb, full, count=3, seed=6)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_random_channel_order_permutes_planes(caffe, tmp_path):
    image = np.stack([np.full((4, 4), v, np.uint8) for v in (10, 20, 30)])
    source = write_lmdb(tmp_path / "lmdb", [image] * BATCH)
    out = batches(caffe, tmp_path, source, only(random_order_prob=1), count=2)
    orders = {tuple(int(v) for v in got[:, 0, 0]) for got in out}
    assert all(sorted(o) == [10, 20, 30] for o in orders) and len(orders) > 2


# ---------------------------------------------------------------- presets and checks
def test_presets_build_the_documented_fields():
    assert augment.train_transform("none") == {"mirror": False}
    assert augment.train_transform("flip") == {"mirror": True}
    full = augment.train_transform("full", {"eigval": [3, 2, 1], "eigvec": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]})
    assert full["distort_param"] == augment.SSD_DISTORT
    assert full["lighting_param"] == dict(alphastd=0.1, eigval=[3, 2, 1], eigvec=[1, 0, 0, 0, 1, 0, 0, 0, 1])
    assert full["random_resized_crop_param"] == augment.RESIZED_CROP
    assert augment.train_transform("colour") == {"mirror": True, "distort_param": augment.SSD_DISTORT}
    assert "distort_param" not in augment.train_transform("scale")
    with pytest.raises(ValueError, match="valid: none, flip, colour, scale, full"):
        augment.preset("color")


def test_imagenet_fallback_basis_is_fb_resnets_in_bgr_pixel_units():
    basis = augment.IMAGENET_PCA_BGR
    vectors = np.array(basis["eigvec"])
    assert np.allclose(vectors.T @ vectors, np.eye(3), atol=2e-3)  # orthonormal axes, as published
    assert basis["eigval"][0] == pytest.approx(0.2175 * 255)
    assert vectors[2].tolist() == [-0.5675, 0.7192, 0.4009]  # row R is fb.resnet.torch's first row


@pytest.mark.parametrize("text, message", [
    ("distort_param { hue_prob: 1.5 hue_delta: 10 }", "distort_param.hue_prob is 1.5, expected a probability"),
    ("distort_param { hue_prob: 1 hue_delta: 200 }", "distort_param.hue_delta is 200, expected 0..180"),
    ("distort_param { contrast_prob: 0.5 contrast_lower: 1.5 contrast_upper: 0.5 }",
     "contrast_lower/contrast_upper are 1.5/0.5"),
    ("lighting_param { alphastd: 0.1 eigval: 1 eigval: 2 }", "has 2 eigval and 0 eigvec values, expected 3 and 9"),
    ("random_resized_crop_param { min_area: 0 }", "area is 0..1, expected 0 < min_area"),
    ("random_resized_crop_param { min_aspect: 2 max_aspect: 1 }", "aspect is 2..1"),
    ("distort_param { hue_prob: 1 hue_delta: nan }", "distort_param.hue_delta is nan, expected 0..180"),
    ("distort_param { brightness_prob: nan }", "distort_param.brightness_prob is nan, expected a probability"),
    ("lighting_param { alphastd: nan }", "lighting_param.alphastd is nan, expected >= 0"),
    ("lighting_param { alphastd: 0.1 eigval: [1, 2, nan] eigvec: [1, 0, 0, 0, 1, 0, 0, 0, 1] }",
     "negative or non-finite value"),
])
def test_check_transform_names_the_field(text, message):
    tp = text_format.Parse(text, caffe_env.caffe_pb2().TransformationParameter())
    problems = augment.check_transform(tp, "net.prototxt (layer 'data')")
    assert len(problems) == 1 and message in problems[0] and problems[0].startswith("net.prototxt (layer 'data')")
    assert "\n" not in problems[0]


@pytest.mark.parametrize("basis, message", [
    ({"eigval": [1, 2, 3], "eigvec": [1, 0, 0, 0, 1, 0, 0, 0, 1]}, "pca_bgr.eigvec must be a 3x3 list"),
    ({"eigval": [1, 2, 3]}, "pca_bgr.eigvec must be a 3x3 list"),
    ({"eigval": [1, -2, 3], "eigvec": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}, "pca_bgr.eigval must be 3 finite numbers"),
])
def test_a_malformed_manifest_basis_is_named(tmp_path, basis, message):
    import json
    (tmp_path / "manifest.json").write_text(json.dumps({"pca_bgr": basis}))
    with pytest.raises(ValueError, match=message) as caught:
        augment.read_basis(str(tmp_path))
    assert str(tmp_path / "manifest.json") in str(caught.value) and "\n" not in str(caught.value)
    assert augment.read_basis(str(tmp_path / "elsewhere")) is None  # no manifest: ImageNet's basis is used


@pytest.mark.parametrize("text, message", [
    ("random_resized_crop_param { min_aspect: 1000 max_aspect: 2000 }", "leaves no crop of a 64x64 image"),
    ("random_resized_crop_param { min_aspect: 0.0001 max_aspect: 0.0002 }", "leaves no crop of a 64x64 image"),
    ("random_resized_crop_param { max_aspect: inf }", "aspect is 0.75..inf"),
    ("distort_param { brightness_prob: 0.5 brightness_delta: inf }", "brightness_delta is inf"),
    ("lighting_param { alphastd: 0.1 eigval: [1, 2, 3] eigvec: [1, 0, 0, 0, nan, 0, 0, 0, 1] }",
     "negative or non-finite value"),
    ("distort_param { contrast_prob: 0 contrast_upper: nan }", "contrast_lower/contrast_upper are 0/nan, expected finite"),
])
def test_check_transform_refuses_impossible_and_non_finite_values(text, message):
    tp = text_format.Parse(text, caffe_env.caffe_pb2().TransformationParameter())
    problems = augment.check_transform(tp, "net.prototxt (layer 'data')")
    assert len(problems) == 1 and message in problems[0], problems


CAFFE_CHILD = """
import sys, json
sys.path.insert(0, sys.argv[1])
from tinycaffe import caffe_env
from test_augment import batches
import pathlib
caffe = caffe_env.import_caffe()
caffe.set_mode_cpu()
batches(caffe, pathlib.Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]), count=2)
print("ran")
"""


@pytest.mark.parametrize("transform, message", [
    # An aspect range that leaves no fallback rectangle: a 0-pixel crop, once a SIGSEGV.
    (dict(crop_size=4, random_resized_crop_param=dict(min_aspect=1000, max_aspect=2000)),
     "leaves no crop of a 8x8 image"),
    (dict(crop_size=4, random_resized_crop_param=dict(min_aspect=0.001, max_aspect=0.002)),
     "leaves no crop of a 8x8 image"),
    (dict(crop_size=4, random_resized_crop_param=dict(max_aspect="Infinity")), "max_aspect < inf"),
    # A NaN or infinite PCA value trained on NaN input.
    (dict(crop_size=4, lighting_param=dict(alphastd=0.1, eigval=[1, "NaN", 1], eigvec=[1, 0, 0, 0, 1, 0, 0, 0, 1])),
     "eigval must be finite"),
    (dict(crop_size=4, lighting_param=dict(alphastd=0.1, eigval=[1, 1, 1], eigvec=[1, 0, 0, 0, "Infinity", 0, 0, 0, 1])),
     "eigvec must be finite"),
    (dict(crop_size=4, distort_param=dict(brightness_prob=0.5, brightness_delta="Infinity")),
     "every delta and bound must be finite"),
])
def test_caffe_itself_stops_on_impossible_augmentation_with_a_check(repo, tmp_path, noise_lmdb, transform, message):
    """Patch 0012: the Data layer CHECKs what augment.check_transform refuses, for nets that never
    went through tinycaffe's checks: an abort with the message, never a crash or NaN batches."""
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, GLOG_logtostderr="1")
    out = subprocess.run([sys.executable, "-c", CAFFE_CHILD, repo, str(tmp_path), noise_lmdb, json.dumps(transform)],
                         capture_output=True, text=True, cwd=os.path.join(repo, "tests"), env=env, timeout=120)
    assert out.returncode == -6 and "ran" not in out.stdout, (out.returncode, out.stderr[-2000:])  # SIGABRT: a CHECK
    assert "Check failed" in out.stderr and message in out.stderr, out.stderr[-2000:]


# ---------------------------------------------------------------- random erasing (patch 0018)
ERASE_FILL = 1000.0  # no transformed pixel can take it: (x - mean) * 1 is within [-120, 155]
PLAIN_32 = dict(mirror=False, mean_value=[100, 110, 120])  # no crop, no mirror: erasing is the only draw


def erased_boxes(out, plain):
    """For each image, the (top, left, h, w) of the erased rectangle, or None; asserts that the
    changed pixels are exactly one rectangle, the same in every channel, set to ERASE_FILL."""
    boxes = []
    for got, want in zip(out, plain):
        changed = got != want
        assert (changed == changed[0]).all()  # every channel, the same pixels
        if not changed.any():
            boxes.append(None)
            continue
        rows, cols = np.flatnonzero(changed[0].any(1)), np.flatnonzero(changed[0].any(0))
        top, left, h, w = rows[0], cols[0], rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert changed[0, top:top + h, left:left + w].all()  # a full rectangle, nothing outside it
        assert (got[:, top:top + h, left:left + w] == ERASE_FILL).all()
        boxes.append((top, left, h, w))
    return boxes


def test_random_erasing_sets_one_rectangle_within_the_ranges(caffe, tmp_path):
    images = random_images(4 * BATCH, size=32, seed=3)
    source = write_lmdb(tmp_path / "erase_lmdb", images)
    erasing = dict(prob=1, value=ERASE_FILL, **{k: v for k, v in augment.RANDOM_ERASING.items() if k != "value"})
    out = batches(caffe, tmp_path, source, dict(PLAIN_32, random_erasing_param=erasing), count=4)
    plain = batches(caffe, tmp_path, source, PLAIN_32, count=4)
    boxes = erased_boxes(out, plain)
    found = [b for b in boxes if b is not None]
    assert len(found) >= 0.9 * len(boxes)  # prob 1: only ten misses in a row leave an image alone
    r = augment.RANDOM_ERASING
    for top, left, h, w in found:
        assert h < 32 and w < 32  # strictly inside, as torchvision
        # h = round(sqrt(t a)), w = round(sqrt(t / a)) for an area t and an aspect a in their ranges
        assert (h - 0.5) * (w - 0.5) <= r["max_area"] * 1024 and (h + 0.5) * (w + 0.5) >= r["min_area"] * 1024
        assert (h - 0.5) / (w + 0.5) <= r["max_aspect"] and (h + 0.5) / (w - 0.5) >= r["min_aspect"]
    areas = [h * w / 1024 for _, _, h, w in found]
    assert 0.1 < np.mean(areas) < 0.25  # uniform in 0.02..0.33 (minus the misfits): about 0.17
    aspects = [h / w for _, _, h, w in found]
    assert min(aspects) < 0.8 and max(aspects) > 1.25  # log-uniform around 1: both sides
    assert len({(t, l) for t, l, _, _ in found}) > len(found) // 2  # positions vary


def test_random_erasing_aspect_is_height_over_width_log_uniform_and_reaches_every_edge(caffe, tmp_path):
    """Height / width, not the other way round (an aspect range above 1 gives tall rectangles);
    log-uniform (about as many tall as wide over 0.3..3.33, where a uniform draw gives three tall
    for one wide); top and left up to the last row and column (Rand(H - h + 1))."""
    source = write_lmdb(tmp_path / "erase_lmdb", random_images(BATCH, size=32, seed=6))
    plain = batches(caffe, tmp_path, source, PLAIN_32, count=16)

    def boxes(**fields):
        erasing = dict(prob=1, value=ERASE_FILL, **fields)
        found = erased_boxes(batches(caffe, tmp_path, source, dict(PLAIN_32, random_erasing_param=erasing),
                                     count=16), plain)
        return [b for b in found if b is not None]

    tall = boxes(min_area=0.05, max_area=0.1, min_aspect=2, max_aspect=3)
    assert len(tall) > 200 and all((h + 0.5) / (w - 0.5) >= 2 for _, _, h, w in tall)  # h/w in [2, 3], rounded
    either = boxes(min_area=0.02, max_area=0.2, min_aspect=0.3, max_aspect=1 / 0.3)
    share_tall = sum(h > w for _, _, h, w in either) / sum(h != w for _, _, h, w in either)
    assert 0.35 < share_tall < 0.65, share_tall
    assert any(t + h == 32 for t, _, h, _ in either) and any(lf + w == 32 for _, lf, _, w in either)
    assert any(t == 0 for t, _, _, _ in either) and any(lf == 0 for _, lf, _, _ in either)


def test_random_erasing_defaults_are_augments_and_any_attempt_count_works(caffe, tmp_path):
    e = caffe_env.caffe_pb2().RandomErasingParameter()
    assert (e.prob, e.max_attempts) == (0, 10)
    for field, value in augment.RANDOM_ERASING.items():
        assert getattr(e, field) == pytest.approx(value), field
    source = write_lmdb(tmp_path / "erase_lmdb", random_images(BATCH, size=32, seed=7))
    plain = batches(caffe, tmp_path, source, PLAIN_32)
    for attempts in (1, 2 ** 31, 2 ** 32 - 1):  # a count above int's range once made no attempt at all
        erasing = dict(prob=1, value=ERASE_FILL, max_attempts=attempts)
        out = batches(caffe, tmp_path, source, dict(PLAIN_32, random_erasing_param=erasing))
        assert sum(b is not None for b in erased_boxes(out, plain)) >= BATCH // 2, attempts


def test_random_erasing_probability_and_its_absence(caffe, tmp_path):
    images = random_images(BATCH, size=32, seed=4)
    source = write_lmdb(tmp_path / "erase_lmdb", images)
    half = dict(PLAIN_32, random_erasing_param=dict(prob=0.5, value=ERASE_FILL))
    out = batches(caffe, tmp_path, source, half, count=16)
    plain = batches(caffe, tmp_path, source, PLAIN_32, count=16)
    erased = sum(b is not None for b in erased_boxes(out, plain)) / len(out)
    assert 0.35 < erased < 0.65, erased  # 256 coins of 0.5 (a few misfits aside): 5 sd either way
    cropped = dict(crop_size=24, mirror=True, mean_value=[100, 110, 120])  # random crops and mirrors too
    assert np.array_equal(batches(caffe, tmp_path, source, dict(cropped, random_erasing_param=dict(prob=0)), count=3),
                          batches(caffe, tmp_path, source, cropped, count=3))  # prob 0: the same draws and values


def test_random_erasing_is_train_only_and_seeded(caffe, tmp_path):
    source = write_lmdb(tmp_path / "erase_lmdb", random_images(BATCH, size=32, seed=5))
    always = dict(PLAIN_32, random_erasing_param=dict(prob=1, value=ERASE_FILL))
    assert np.array_equal(batches(caffe, tmp_path, source, always, phase="TEST"),
                          batches(caffe, tmp_path, source, PLAIN_32, phase="TEST"))
    first = batches(caffe, tmp_path, source, always, count=2, seed=7)
    assert np.array_equal(first, batches(caffe, tmp_path, source, always, count=2, seed=7))
    assert not np.array_equal(first, batches(caffe, tmp_path, source, always, count=2, seed=8))


@pytest.mark.parametrize("text, message", [
    ("random_erasing_param { prob: 1.5 }", "random_erasing_param.prob is 1.5, expected a probability in [0, 1]"),
    ("random_erasing_param { prob: 0.5 min_area: 0 }", "area is 0..0.333333, expected 0 < min_area"),
    ("random_erasing_param { prob: 0.5 min_area: 0.5 max_area: 0.4 }", "area is 0.5..0.4"),
    ("random_erasing_param { prob: 0.5 max_aspect: inf }", "aspect is 0.3..inf"),
    ("random_erasing_param { prob: 0.5 value: nan }", "random_erasing_param.value is nan, expected a finite number"),
    ("random_erasing_param { prob: 0.5 max_attempts: 0 }", "random_erasing_param.max_attempts is 0, expected >= 1"),
])
def test_check_transform_names_random_erasings_field(text, message):
    tp = text_format.Parse(text, caffe_env.caffe_pb2().TransformationParameter())
    problems = augment.check_transform(tp, "net.prototxt (layer 'data')")
    assert len(problems) == 1 and message in problems[0], problems


@pytest.mark.parametrize("erasing, message", [
    (dict(prob=2), "random_erasing_param.prob must be in [0, 1]"),
    (dict(prob=0.5, min_area=0), "need 0 < min_area <= max_area <= 1"),
    (dict(prob=0.5, value="NaN"), "random_erasing_param.value must be finite"),
])
def test_caffe_itself_stops_on_impossible_random_erasing(repo, tmp_path, noise_lmdb, erasing, message):
    test_caffe_itself_stops_on_impossible_augmentation_with_a_check(
        repo, tmp_path, noise_lmdb, dict(crop_size=4, random_erasing_param=erasing), message)


def test_gen_writes_random_erasing_into_train_only(tmp_path):
    from tinycaffe import check, gen
    cfg = gen.GenConfig(out=str(tmp_path), lmdb_dir=str(tmp_path / "lmdb"), mode="cpu", random_erasing=0.25)
    gen.generate(["tiny"], cfg)
    path = str(tmp_path / "tiny" / "train_val.prototxt")
    _, net = check.parse(path)
    train, test = [layer for layer in net.layer if layer.type == "Data"]
    e = train.transform_param.random_erasing_param
    assert (e.prob, e.min_area, e.max_aspect, e.value) == pytest.approx((0.25, 0.02, 1 / 0.3, 0.0))
    assert not test.transform_param.HasField("random_erasing_param")
    assert "random erasing 0.25" in open(path).readline() + open(path).readlines()[1]
    with pytest.raises(ValueError, match="--random-erasing must be a probability in \\[0, 1\\]"):
        gen.generate(["tiny"], gen.GenConfig(out=str(tmp_path), random_erasing=-0.1))
    with pytest.raises(ValueError, match="--random-erasing 1e-50 is 0 in Caffe's float"):
        gen.generate(["tiny"], gen.GenConfig(out=str(tmp_path), random_erasing=1e-50))
