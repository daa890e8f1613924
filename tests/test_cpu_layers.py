"""Patches 0011 (Caffe's CPU layers on OpenMP threads, several images per convolution GEMM)
and 0017 (Scale, Eltwise SUM, Split and cross-channel LRN on threads): the rewritten layers
still compute Caffe's functions. Each case is one real Caffe layer (Convolution, Pooling,
ReLU, PReLU, BatchNorm; Scale, Eltwise, LRN, and the Split Caffe inserts before a blob used
twice) on an Input blob with force_backward:

- its gradients against finite differences, Caffe's GradientChecker method (central
  differences, step 1e-2, tolerance 1e-3 x max(|analytic|, |numeric|, 1)), through pycaffe;
- for patch 0017's layers, the outputs and the whole input gradient against float64
  references of Caffe's definitions;
- its outputs and gradients with 1 thread and with 2 (OMP_NUM_THREADS, separate processes):
  equal bit for bit, except a convolution's weight and bias gradients and anything a
  convolution computes with several images per GEMM, whose sums are grouped by thread or
  by chunk (within 1e-5 of each other).

The shapes pick the code paths: convolutions with few output pixels (36, 16, 42) run the
side-by-side GEMM (cpu_gemm_images > 1: up to ceil(images / threads) images per GEMM, so the
GEMMs' widths differ between 1 and 2 threads), the one with 3600 pixels and the 1x1 one
Caffe's one-image GEMM.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tinycaffe import caffe_env

STEP, TOLERANCE = 1e-2, 1e-3  # Caffe's GradientChecker(1e-2, 1e-3)

def layer(kind, params="", tops=("y",)):
    """The layer under test, "l", on the Input blob "x"."""
    return 'layer { name: "l" type: "%s" bottom: "x" %s %s }' % (kind, " ".join('top: "%s"' % t for t in tops), params)


# a second bottom for Eltwise: x squared (x then feeds two or three bottoms, so Caffe inserts a
# Split layer before them, whose backward pass patch 0017 rewrote too)
SQUARE = 'layer { name: "sq" type: "Power" bottom: "x" top: "x2" power_param { power: 2 } }\n'


def conv(params):
    return layer("Convolution", "convolution_param { %s }" % params)


def pool(params, tops=("y",)):
    return layer("Pooling", "pooling_param { %s }" % params, tops)


CASES = {
    # name: (input shape, layer text); fillers are replaced by seeded values below
    "conv_3x3_one_image_per_gemm": ((4, 3, 60, 60), conv("num_output: 4 kernel_size: 3 pad: 1")),
    "conv_3x3_images_side_by_side": ((12, 4, 6, 6), conv("num_output: 6 kernel_size: 3 pad: 1")),
    "conv_group_stride_side_by_side": ((12, 4, 9, 9), conv("num_output: 6 kernel_size: 3 stride: 2 group: 2")),
    "conv_1x1_no_bias": ((6, 5, 7, 7), conv("num_output: 3 kernel_size: 1 bias_term: false")),
    "conv_5x5_pad_stride": ((5, 2, 11, 13), conv("num_output: 3 kernel_size: 5 pad: 2 stride: 2")),
    "maxpool_2x2": ((4, 5, 12, 12), pool("pool: MAX kernel_size: 2 stride: 2")),
    "maxpool_3x3_s2_pad_ceil": ((4, 5, 13, 13), pool("pool: MAX kernel_size: 3 stride: 2 pad: 1")),
    "maxpool_with_mask_top": ((4, 5, 10, 10), pool("pool: MAX kernel_size: 3 stride: 2", tops=("y", "mask"))),
    "avepool_3x3_pad": ((4, 5, 11, 11), pool("pool: AVE kernel_size: 3 stride: 2 pad: 1")),
    "relu": ((4, 8, 40, 40), layer("ReLU")),
    "leaky_relu_in_place": ((4, 8, 40, 40), layer("ReLU", "relu_param { negative_slope: 0.1 }", tops=("x",))),
    "prelu_channelwise": ((4, 8, 40, 40), layer("PReLU")),
    "prelu_shared_in_place": ((4, 8, 40, 40), layer("PReLU", "prelu_param { channel_shared: true }", tops=("x",))),
    "prelu_2d_blob": ((64, 300), layer("PReLU")),
    "batchnorm_batch_statistics": ((16, 32, 9, 9), layer("BatchNorm", "batch_norm_param { use_global_stats: false }")),
    "batchnorm_batch_statistics_in_place": ((16, 32, 9, 9), layer("BatchNorm",
                                                                  "batch_norm_param { use_global_stats: false }",
                                                                  tops=("x",))),
    "batchnorm_global_statistics": ((16, 32, 9, 9), layer("BatchNorm", "batch_norm_param { use_global_stats: true }")),
    # patch 0017
    "scale_with_bias": ((16, 32, 9, 9), layer("Scale", "scale_param { bias_term: true }")),
    "scale_with_bias_in_place": ((16, 32, 9, 9), layer("Scale", "scale_param { bias_term: true }", tops=("x",))),
    "scale_without_bias": ((16, 32, 9, 9), layer("Scale")),
    "scale_2d_blob": ((64, 600), layer("Scale", "scale_param { bias_term: true }")),
    "scale_one_per_element": ((4, 8, 40, 40), layer("Scale", "scale_param { axis: 0 num_axes: -1 bias_term: true }")),
    "scale_scalar": ((16, 32, 9, 9), layer("Scale", "scale_param { num_axes: 0 bias_term: true }")),
    "scale_per_image": ((16, 32, 9, 9), layer("Scale", "scale_param { axis: 0 num_axes: 1 bias_term: true }")),
    "eltwise_sum_coefficients_and_split": ((4, 8, 40, 40), SQUARE + (
        'layer { name: "l" type: "Eltwise" bottom: "x" bottom: "x2" bottom: "x" top: "y" '
        "eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 } }")),
    "eltwise_sum_two_bottoms": ((4, 8, 40, 40), SQUARE + (
        'layer { name: "l" type: "Eltwise" bottom: "x2" bottom: "x" top: "y" }')),
    "lrn_across_channels": ((4, 12, 9, 9), layer("LRN", "lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 k: 1 }")),
    "lrn_window_wider_than_channels": ((3, 2, 5, 5),
                                       layer("LRN", "lrn_param { local_size: 5 alpha: 0.9 beta: 0.6 k: 2 }")),
    "lrn_beta_one": ((4, 12, 9, 9), layer("LRN", "lrn_param { local_size: 3 alpha: 0.3 beta: 1 k: 1.5 }")),
}
# BatchNorm's blobs are statistics, not learned: Caffe computes no gradient for them.
NO_PARAM_GRADIENTS = ("batchnorm_batch_statistics", "batchnorm_batch_statistics_in_place",
                      "batchnorm_global_statistics")
# Every case is big enough for the patch's threads to start (parallel_ranges' thresholds:
# pooling >= 16 planes, ReLU, Eltwise and Split > 32768 values, PReLU, BatchNorm and Scale
# 32768 / plane size planes, LRN 2 images),
# so the 1-vs-2-threads test compares one thread with two.
# What may differ between 1 and 2 threads: summed over images in another grouping.
GROUPED_SUMS = {"conv_3x3_one_image_per_gemm": ("param",),
                "conv_1x1_no_bias": ("param",),
                "conv_5x5_pad_stride": ("param", "top", "bottom"),  # 42 pixels: side by side too
                "conv_3x3_images_side_by_side": ("param", "top", "bottom"),
                "conv_group_stride_side_by_side": ("param", "top", "bottom")}


def net_text(shape, text):
    return ('force_backward: true\nlayer { name: "in" type: "Input" top: "x" input_param { shape { %s } } }\n%s\n'
            % (" ".join("dim: %d" % d for d in shape), text))


def inputs(shape, seed, pooling):
    """Values away from ReLU's kink and, for pooling, distinct by more than two steps, so a
    finite difference never crosses a kink (Caffe's checker has its kink/kink_range for this)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if pooling:
        values = (rng.permutation(n) - n / 2) * (4 * STEP)
    else:
        values = rng.uniform(0.2, 1.0, n) * rng.choice([-1.0, 1.0], n)
    return values.reshape(shape).astype(np.float32)


def build(caffe, folder, name, seed=0):
    """The case's net with seeded input, parameters and top gradient R (objective: sum(top * R))."""
    shape, text = CASES[name]
    path = os.path.join(str(folder), name + ".prototxt")
    with open(path, "w") as f:
        f.write(net_text(shape, text))
    net = caffe.Net(path, caffe.TEST)
    rng = np.random.default_rng(seed + 1)
    base = inputs(shape, seed, "Pooling" in text)
    net.blobs["x"].data[...] = base
    for blob in net.params.get("l", []):
        blob.data[...] = rng.uniform(-0.5, 0.5, blob.data.shape)
    if "BatchNorm" in text:  # a valid state: variance > 0, scale factor 1
        net.params["l"][1].data[...] = rng.uniform(0.5, 1.5, net.params["l"][1].data.shape)
        net.params["l"][2].data[...] = 1.0
    top = net.top_names["l"][0]
    net.forward()
    weights = rng.uniform(-1, 1, net.blobs[top].data.shape).astype(np.float32)
    net.base_input = base  # an in-place layer overwrites x: every forward starts from this
    return net, top, weights


def forward(net):
    net.blobs["x"].data[...] = net.base_input
    net.forward()


def analytic(net, top, weights):
    forward(net)
    net.blobs[top].diff[...] = weights
    for blob in net.params.get("l", []):
        blob.diff[...] = 0
    net._backward(len(net.layers) - 1, 0)
    return net.blobs["x"].diff.copy(), [b.diff.copy() for b in net.params.get("l", [])]


def objective(net, top, weights, source, index, value):
    """sum(top * R) with one element of the input (or of a parameter) set to value."""
    if source is None:
        saved, net.base_input = net.base_input, net.base_input.copy()
        net.base_input.flat[index] = value
        forward(net)
        net.base_input = saved
    else:
        target = net.params["l"][source].data
        saved = target.flat[index]
        target.flat[index] = value
        forward(net)
        target.flat[index] = saved
    return float(np.sum(net.blobs[top].data.astype(np.float64) * weights))


def check_gradient(net, top, weights, source, got, samples=24):
    """Central differences at `samples` elements of the input or parameter `source`."""
    data = net.base_input if source is None else net.params["l"][source].data
    rng = np.random.default_rng(7)
    bad = []
    for index in rng.choice(data.size, size=min(samples, data.size), replace=False):
        x = float(data.flat[index])
        numeric = (objective(net, top, weights, source, index, x + STEP)
                   - objective(net, top, weights, source, index, x - STEP)) / (2 * STEP)
        a = float(got.flat[index])
        if abs(a - numeric) > TOLERANCE * max(abs(a), abs(numeric), 1.0):
            bad.append((int(index), a, numeric))
    return bad


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match_finite_differences(caffe, tmp_path, name):
    net, top, weights = build(caffe, tmp_path, name)
    bottom_diff, param_diffs = analytic(net, top, weights)
    assert np.abs(bottom_diff).max() > 0, "backward gave no gradient at all"
    bad = check_gradient(net, top, weights, None, bottom_diff)
    for i, diff in enumerate([] if name in NO_PARAM_GRADIENTS else param_diffs):
        bad += [("param %d" % i,) + b for b in check_gradient(net, top, weights, i, diff)]
    assert not bad, "analytic vs numeric gradient (index, analytic, numeric): %s" % bad[:5]


def channel_windows(a, before, size):
    """For each channel c, the sum of a over channels c - before .. c - before + size - 1,
    zero outside the blob."""
    padded = np.pad(a, ((0, 0), (before, size - 1 - before), (0, 0), (0, 0)))
    return sum(padded[:, i:i + a.shape[1]] for i in range(size))


def lrn_scale(x, size, alpha, k):
    """Caffe's LRN scale: k + alpha / size * the sum of x^2 over the window from c - (size - 1) / 2."""
    return k + alpha / size * channel_windows(x * x, (size - 1) // 2, size)


def lrn_reference(x, size, alpha, beta, k):
    """Caffe's ACROSS_CHANNELS LRN: x / scale^beta."""
    return x / lrn_scale(x, size, alpha, k) ** beta


def scale_shape(x, scale):
    """The broadcast shape of a Scale parameter: axis 1 (Caffe's default) unless it is the
    whole blob's or one per image (axis 0)."""
    axis = 0 if scale.shape in (x.shape, x.shape[:1]) and scale.ndim else 1
    return (1,) * axis + scale.shape + (1,) * (x.ndim - axis - scale.ndim)


def scale_reference(x, params):
    scale = params[0]
    shape = scale_shape(x, scale)
    bias = params[1].reshape(shape) if len(params) > 1 else 0.0
    return x * scale.reshape(shape) + bias


# float64 references of the patch 0017 layers' outputs (finite differences check the
# gradients against the outputs, so the outputs need their own check)
REFERENCES = {
    "scale_with_bias": scale_reference,
    "scale_with_bias_in_place": scale_reference,
    "scale_without_bias": scale_reference,
    "scale_2d_blob": scale_reference,
    "scale_one_per_element": scale_reference,
    "scale_per_image": scale_reference,
    "scale_scalar": scale_reference,
    "eltwise_sum_coefficients_and_split": lambda x, p: x - 0.5 * x * x + 2 * x,
    "eltwise_sum_two_bottoms": lambda x, p: x * x + x,
    "lrn_across_channels": lambda x, p: lrn_reference(x, 5, 0.5, 0.75, 1.0),
    "lrn_window_wider_than_channels": lambda x, p: lrn_reference(x, 5, 0.9, 0.6, 2.0),
    "lrn_beta_one": lambda x, p: lrn_reference(x, 3, 0.3, 1.0, 1.5),
}


def lrn_gradient_reference(x, r, size, alpha, beta, k):
    """d sum(R * y) / dx of Caffe's LRN: R s^-beta - 2 alpha beta / size x sum over the windows
    that hold x of R y / s."""
    s = lrn_scale(x, size, alpha, k)
    ratio = r * x * s ** -beta / s
    # the windows that hold channel c start at c - (size - 1 - pre) .. c + pre: the transpose
    window = channel_windows(ratio, size - 1 - (size - 1) // 2, size)
    return r * s ** -beta - 2 * alpha * beta / size * x * window


def scale_gradient_reference(x, r, params):
    return r * params[0].reshape(scale_shape(x, params[0]))


# float64 references of the whole input gradient (finite differences sample 24 elements)
GRADIENT_REFERENCES = {
    "scale_with_bias": scale_gradient_reference,
    "scale_with_bias_in_place": scale_gradient_reference,
    "scale_without_bias": scale_gradient_reference,
    "scale_2d_blob": scale_gradient_reference,
    "scale_one_per_element": scale_gradient_reference,
    "scale_per_image": scale_gradient_reference,
    "scale_scalar": scale_gradient_reference,
    "eltwise_sum_coefficients_and_split": lambda x, r, p: r * (3 - x),
    "eltwise_sum_two_bottoms": lambda x, r, p: r * (2 * x + 1),
    "lrn_across_channels": lambda x, r, p: lrn_gradient_reference(x, r, 5, 0.5, 0.75, 1.0),
    "lrn_window_wider_than_channels": lambda x, r, p: lrn_gradient_reference(x, r, 5, 0.9, 0.6, 2.0),
    "lrn_beta_one": lambda x, r, p: lrn_gradient_reference(x, r, 3, 0.3, 1.0, 1.5),
}


@pytest.mark.parametrize("name", sorted(GRADIENT_REFERENCES))
def test_input_gradients_match_a_float64_reference(caffe, tmp_path, name):
    net, top, weights = build(caffe, tmp_path, name)
    params = [b.data.astype(np.float64) for b in net.params.get("l", [])]
    got, _ = analytic(net, top, weights)
    expected = GRADIENT_REFERENCES[name](net.base_input.astype(np.float64), weights.astype(np.float64), params)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * float(np.abs(expected).max()))


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_outputs_match_a_float64_reference(caffe, tmp_path, name):
    net, top, _ = build(caffe, tmp_path, name)
    forward(net)
    params = [b.data.astype(np.float64) for b in net.params.get("l", [])]
    expected = REFERENCES[name](net.base_input.astype(np.float64), params)
    got = net.blobs[top].data
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * float(np.abs(expected).max()))


@pytest.mark.parametrize("images,accumulates", [(16, True), (1, False)])
def test_scale_parameter_gradients_accumulate_as_in_caffe(caffe, tmp_path, images, accumulates):
    """Two backward passes without zeroing the diffs (iter_size > 1): Caffe's Scale adds its
    scale and bias gradients to what is there, except the scale of a single image of several
    channels, which its GEMV overwrote (stock Caffe's rule, which patch 0017 keeps)."""
    path = tmp_path / "scale.prototxt"
    path.write_text(net_text((images, 32, 9, 9), layer("Scale", "scale_param { bias_term: true }")))
    net = caffe.Net(str(path), caffe.TEST)
    rng = np.random.default_rng(3)
    net.blobs["x"].data[...] = rng.uniform(-1, 1, net.blobs["x"].data.shape)
    net.params["l"][0].data[...] = rng.uniform(0.5, 1.5, 32)
    net.forward()
    net.blobs["y"].diff[...] = rng.uniform(-1, 1, net.blobs["y"].data.shape)
    for blob in net.params["l"]:
        blob.diff[...] = 0
    net._backward(len(net.layers) - 1, 0)
    once = [b.diff.copy() for b in net.params["l"]]
    net._backward(len(net.layers) - 1, 0)
    scale, bias = (b.diff for b in net.params["l"])
    tolerance = dict(rtol=1e-5, atol=1e-6 * max(float(np.abs(once[0]).max()), float(np.abs(once[1]).max())))
    np.testing.assert_allclose(scale, 2 * once[0] if accumulates else once[0], **tolerance)
    np.testing.assert_allclose(bias, 2 * once[1], **tolerance)
    expected_bias = net.blobs["y"].diff.astype(np.float64).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(once[1], expected_bias, rtol=1e-5, atol=1e-6 * float(np.abs(expected_bias).max()))
    expected_scale = (net.blobs["y"].diff.astype(np.float64) * net.blobs["x"].data).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(once[0], expected_scale, rtol=1e-5, atol=1e-6 * float(np.abs(expected_scale).max()))


def two_input_net(tmp_path, shapes, text):
    """A net with Inputs x and z of the given shapes, then text; force_backward."""
    dims = " ".join("shape { %s }" % " ".join("dim: %d" % d for d in shape) for shape in shapes)
    path = tmp_path / "two.prototxt"
    path.write_text('force_backward: true\nlayer { name: "in" type: "Input" top: "x" top: "z" input_param { %s } }\n%s\n'
                    % (dims, text))
    return str(path)


def test_scale_from_a_second_bottom_overwrites_its_diff(caffe, tmp_path):
    """The scale as bottom[1] (with a learned bias): y = x * z + b; z's diff is written (not
    added to), its gradient sum(dy * x) over images and pixels; the bias's is added to."""
    text = 'layer { name: "l" type: "Scale" bottom: "x" bottom: "z" top: "y" scale_param { axis: 1 bias_term: true } }'
    net = caffe.Net(two_input_net(tmp_path, [(8, 16, 9, 9), (16,)], text), caffe.TEST)
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (8, 16, 9, 9)).astype(np.float32)
    z = rng.uniform(0.5, 1.5, 16).astype(np.float32)
    net.blobs["x"].data[...], net.blobs["z"].data[...] = x, z
    net.params["l"][0].data[...] = rng.uniform(-0.5, 0.5, 16)
    net.forward()
    b = net.params["l"][0].data.astype(np.float64)
    expected = x.astype(np.float64) * z[None, :, None, None] + b[None, :, None, None]
    np.testing.assert_allclose(net.blobs["y"].data, expected, rtol=1e-6, atol=1e-6)
    dy = rng.uniform(-1, 1, x.shape).astype(np.float32)
    net.blobs["y"].diff[...] = dy
    net.blobs["z"].diff[...] = 0.25
    net.params["l"][0].diff[...] = 0.25
    net._backward(len(net.layers) - 1, 0)
    d64 = dy.astype(np.float64)
    tolerance = lambda e: dict(rtol=1e-5, atol=1e-6 * float(np.abs(e).max()))  # noqa: E731
    np.testing.assert_allclose(net.blobs["x"].diff, d64 * z[None, :, None, None], **tolerance(d64))
    bias = d64.sum(axis=(0, 2, 3)) + 0.25
    np.testing.assert_allclose(net.params["l"][0].diff, bias, **tolerance(bias))
    scale = (d64 * x).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(net.blobs["z"].diff, scale, **tolerance(scale))


def test_eltwise_sum_in_place_adds_as_caffe_does(caffe, tmp_path):
    """In place (top = bottom[0]), Caffe's zero fill wipes bottom[0] before its AXPYs: with
    coefficients 2 and -1 the top is -z, not 2x - z. Patch 0017 keeps that."""
    text = ('layer { name: "l" type: "Eltwise" bottom: "x" bottom: "z" top: "x" '
            "eltwise_param { operation: SUM coeff: 2 coeff: -1 } }")
    net = caffe.Net(two_input_net(tmp_path, [(4, 8, 40, 40), (4, 8, 40, 40)], text), caffe.TEST)
    rng = np.random.default_rng(6)
    net.blobs["x"].data[...] = rng.uniform(-1, 1, (4, 8, 40, 40))
    z = rng.uniform(-1, 1, (4, 8, 40, 40)).astype(np.float32)
    net.blobs["z"].data[...] = z
    net.forward()
    np.testing.assert_array_equal(net.blobs["x"].data, -z)


def test_scale_by_zero_propagates_nan(caffe, tmp_path):
    """NaN and inf times a zero scale are NaN (IEEE), so a diverged blob stays visibly NaN. Stock
    Caffe's CPU Scale went through OpenBLAS 0.3.21's sscal, which writes zeros for a zero
    factor and hid them; patch 0017's loop multiplies (this test fails on the build before it)."""
    path = tmp_path / "zero.prototxt"
    path.write_text(net_text((2, 3, 2, 2), layer("Scale")))
    net = caffe.Net(str(path), caffe.TEST)
    x = np.ones((2, 3, 2, 2), np.float32)
    x[0, 0, 0, 0], x[1, 0, 1, 1] = np.nan, np.inf
    net.blobs["x"].data[...] = x
    net.params["l"][0].data[...] = [0.0, 1.0, 2.0]
    net.forward()
    y = net.blobs["y"].data
    assert np.isnan(y[0, 0, 0, 0]) and np.isnan(y[1, 0, 1, 1])
    assert np.count_nonzero(np.isnan(y)) == 2 and y[0, 0, 0, 1] == 0 and y[0, 2, 0, 0] == 2


RUNNER = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import test_cpu_layers as t
from tinycaffe import caffe_env
caffe = caffe_env.import_caffe()
caffe.set_mode_cpu()
out = {}
for name in t.CASES:
    net, top, weights = t.build(caffe, sys.argv[2], name)
    t.forward(net)
    for i, blob in enumerate(net.top_names["l"]):  # every top (max pooling's mask too)
        out[name + "/top%d" % i] = net.blobs[blob].data.copy()
    bottom, params = t.analytic(net, top, weights)
    out[name + "/bottom"] = bottom
    for i, p in enumerate(params):
        out[name + "/param%d" % i] = p
np.savez(sys.argv[3], **out)
"""


def run_with_threads(tmp_path, threads):
    out = str(tmp_path / ("threads%d.npz" % threads))
    folder = tmp_path / ("nets%d" % threads)
    folder.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", RUNNER, os.path.dirname(os.path.abspath(__file__)), str(folder),
                           out], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.load(out)


def test_one_thread_and_two_threads_agree(tmp_path):
    one, two = run_with_threads(tmp_path, 1), run_with_threads(tmp_path, 2)
    assert sorted(one.files) == sorted(two.files)
    differences = {}
    for key in one.files:
        name, part = key.split("/")
        a, b = one[key], two[key]
        kind = "param" if part.startswith("param") else "top" if part.startswith("top") else part
        if kind in GROUPED_SUMS.get(name, ()):
            scale = max(float(np.abs(a).max()), 1e-30)
            if float(np.abs(a - b).max()) > 1e-5 * scale:
                differences[key] = float(np.abs(a - b).max()) / scale
        elif not np.array_equal(a, b):
            differences[key] = "not bit-identical"
    assert not differences, json.dumps(differences)


def test_the_build_runs_its_cpu_layers_on_openmp_threads():
    """The CPU flavour is built with OpenMP and OpenBLAS's OpenMP flavour (patch 0011's
    speed needs both; scripts/install_caffe.sh records them in the build stamp)."""
    location = caffe_env.read_location()
    if location.get("CAFFE_FLAVOUR") != "cpu":
        pytest.skip("the active build is %s; the OpenMP build is the CPU flavour's"
                    % location.get("CAFFE_FLAVOUR"))
    root = location["CAFFE_ROOT"]
    if not os.path.isfile(os.path.join(root, ".tinycaffe-build")):
        pytest.skip("CAFFE_ROOT=%s is not a build of install_caffe.sh (no build stamp)" % root)
    with open(os.path.join(root, ".tinycaffe-build")) as f:
        stamp = f.readline()
    assert "blas=openblas-openmp" in stamp, stamp
    libcaffe = [os.path.join(root, "lib", n) for n in os.listdir(os.path.join(root, "lib"))
                if n.startswith("libcaffe.so")][0]
    ldd = subprocess.run(["ldd", libcaffe], capture_output=True, text=True).stdout
    assert "libgomp" in ldd and "openblas-openmp" in ldd, ldd


def test_max_pooling_window_without_a_maximum_passes_no_gradient(caffe, tmp_path):
    """A window of only -inf has no maximum (index -1). Caffe added its gradient to
    bottom_diff[-1] of its plane, the previous plane's last element, which planes on threads
    would race on; patch 0011 drops it. Here plane 1's first window is all -inf: plane 0's
    last element keeps exactly its own gradient."""
    path = tmp_path / "pool.prototxt"
    path.write_text(net_text((1, 2, 4, 4), pool("pool: MAX kernel_size: 2 stride: 2")))
    net = caffe.Net(str(path), caffe.TEST)
    x = np.arange(32, dtype=np.float32).reshape(1, 2, 4, 4)
    x[0, 1, :2, :2] = -np.inf
    net.blobs["x"].data[...] = x
    net.forward()
    assert net.blobs["y"].data[0, 1, 0, 0] == np.float32(-3.4028235e38)  # -FLT_MAX: no maximum found
    net.blobs["y"].diff[...] = 1.0
    net._backward(len(net.layers) - 1, 0)
    diff = net.blobs["x"].diff
    assert diff[0, 0, 3, 3] == 1.0  # plane 0's own window maximum, and nothing from plane 1
    assert diff.sum() == 7.0  # 8 windows, one without a maximum
