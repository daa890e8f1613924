"""Patch 0019: Caffe's Convolution layer runs its CPU passes in oneDNN (engine DEFAULT) unless
`engine: CAFFE` asks for Caffe's im2col + GEMM. Both engines, on the same real Caffe layer,
against a float64 reference of Caffe's definition (cross-correlation with stride, pad,
dilation and groups; weight and bias gradients added to the diffs, the bottom gradient
written): outputs, input gradients, parameter gradients; a net that changes shape between
passes (batch alone, image alone); parameters and bottoms that take no gradient; and proof
that DEFAULT runs oneDNN for every one of these shapes (its verbose log) and CAFFE and
force_nd_im2col do not, so the reference checks cover the new kernels.
"""
import collections
import os
import subprocess
import sys

import numpy as np
import pytest

from tinycaffe import caffe_env

ENGINES = ("DEFAULT", "CAFFE")


def geometry(params):
    """(kernel, stride, pad, dilation) as (h, w) pairs from a case's parameters."""
    def pair(name, default):
        value = params.get(name, default)
        return value if isinstance(value, tuple) else (value, value)
    return pair("kernel", 3), pair("stride", 1), pair("pad", 0), pair("dilation", 1)


CASES = {
    # name: (bottom shape, num_output, parameters)
    "3x3_pad": ((2, 3, 9, 9), 4, dict(pad=1)),
    "3x3_stride2_uneven": ((3, 4, 12, 11), 5, dict(stride=2, pad=1)),
    "5x5_stride2_pad2": ((2, 3, 13, 12), 8, dict(kernel=5, stride=2, pad=2)),
    "groups": ((3, 8, 7, 7), 6, dict(stride=2, pad=1, group=2)),
    "depthwise": ((2, 6, 8, 8), 6, dict(pad=1, group=6)),
    "dilation": ((2, 6, 11, 11), 4, dict(pad=2, dilation=2)),
    "1x1_no_bias": ((2, 4, 8, 10), 5, dict(kernel=1, bias=False)),
    "1x1_stride2": ((2, 16, 9, 9), 8, dict(kernel=1, stride=2)),
    "rectangular": ((2, 5, 9, 8), 7, dict(kernel=(3, 2), stride=(1, 2), pad=(1, 0))),
    "wide_blocked": ((4, 32, 15, 15), 48, dict(pad=1)),  # channels past oneDNN's 16-wide blocks
}


def conv_text(name, num_output, params, engine, bottoms=("x",), tops=("y",), extra=""):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry(params)
    assert dh == dw, "Caffe's dilation field here: one value"
    return ('layer { name: "%s" type: "Convolution" %s %s %s convolution_param { num_output: %d '
            "kernel_h: %d kernel_w: %d stride_h: %d stride_w: %d pad_h: %d pad_w: %d dilation: %d "
            "group: %d bias_term: %s engine: %s%s } }"
            % (name, " ".join('bottom: "%s"' % b for b in bottoms), " ".join('top: "%s"' % t for t in tops), extra,
               num_output, kh, kw, sh, sw, ph, pw, dh, params.get("group", 1),
               "true" if params.get("bias", True) else "false", engine,
               " force_nd_im2col: true" if params.get("force_nd_im2col") else ""))


def input_text(shapes, names=("x",)):
    return ('force_backward: true\nlayer { name: "in" type: "Input" %s input_param { %s } }\n'
            % (" ".join('top: "%s"' % n for n in names),
               " ".join("shape { %s }" % " ".join("dim: %d" % d for d in s) for s in shapes)))


def make_net(caffe, tmp_path, text, tag):
    path = tmp_path / ("%s.prototxt" % tag)
    path.write_text(text)
    return caffe.Net(str(path), caffe.TEST)


def output_size(size, kernel, stride, pad, dilation):
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def windows(shape, params):
    """For each kernel tap (i, j): the slices of the padded bottom it reads for every output."""
    _, _, h, w = shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry(params)
    oh, ow = output_size(h, kh, sh, ph, dh), output_size(w, kw, sw, pw, dw)
    for i in range(kh):
        for j in range(kw):
            yield i, j, (slice(i * dh, i * dh + sh * (oh - 1) + 1, sh), slice(j * dw, j * dw + sw * (ow - 1) + 1, sw))


def padded(x, params):
    (_, _), (_, _), (ph, pw), _ = geometry(params)
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))


def reference(x, weight, bias, params, top_diff):
    """float64: Caffe's convolution y (cross-correlation per group, + bias) and, for the
    objective sum(y * top_diff), the gradients of x, the weights and the bias."""
    group = params.get("group", 1)
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    out_per_group = out_channels // group
    xp = padded(x, params)
    y = dxp = None
    dweight = np.zeros_like(weight)
    for i, j, (rows, cols) in windows(x.shape, params):
        for g in range(group):
            ins, outs = slice(g * in_per_group, (g + 1) * in_per_group), slice(g * out_per_group, (g + 1) * out_per_group)
            patch = xp[:, ins, rows, cols]
            contribution = np.einsum("nchw,oc->nohw", patch, weight[outs, :, i, j])
            if y is None:
                y = np.zeros((x.shape[0], out_channels) + contribution.shape[2:])
                dxp = np.zeros_like(xp)
            y[:, outs] += contribution
            dweight[outs, :, i, j] = np.einsum("nohw,nchw->oc", top_diff[:, outs], patch)
            dxp[:, ins, rows, cols] += np.einsum("nohw,oc->nchw", top_diff[:, outs], weight[outs, :, i, j])
    (_, _), (_, _), (ph, pw), _ = geometry(params)
    dx = dxp[:, :, ph:ph + x.shape[2], pw:pw + x.shape[3]]
    if bias is not None:
        y += bias[None, :, None, None]
    return y, dx, dweight, top_diff.sum(axis=(0, 2, 3))


def assert_close(got, expected, what):
    scale = max(float(np.abs(expected).max()), 1e-30)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    error = float(np.abs(got.astype(np.float64) - expected).max()) / scale
    assert error <= 2e-6, "%s: max error %.3g of the largest value" % (what, error)


def seeded(shape, seed):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def run_and_check(net, params, x, seed, layer="l", top="y", bottom="x", start=0.25):
    """One forward and backward of the layer, from diffs preset to `start` (Caffe adds the
    parameter gradients to them), checked against the float64 reference."""
    blobs = net.params[layer]
    net.blobs[bottom].data[...] = x
    net.forward()
    weight = blobs[0].data.astype(np.float64)
    bias = blobs[1].data.astype(np.float64) if len(blobs) > 1 else None
    top_diff = seeded(net.blobs[top].data.shape, seed + 1)
    y, dx, dweight, dbias = reference(x.astype(np.float64), weight, bias, params, top_diff.astype(np.float64))
    assert_close(net.blobs[top].data, y, "output")
    net.blobs[top].diff[...] = top_diff
    for blob in blobs:
        blob.diff[...] = start
    net._backward(len(net.layers) - 1, 0)
    assert_close(net.blobs[bottom].diff, dx, "input gradient")
    assert_close(blobs[0].diff, dweight + start, "weight gradient")
    if bias is not None:
        assert_close(blobs[1].diff, dbias + start, "bias gradient")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_both_engines_compute_caffes_convolution(caffe, tmp_path, name, engine):
    shape, num_output, params = CASES[name]
    net = make_net(caffe, tmp_path, input_text([shape]) + conv_text("l", num_output, params, engine), name)
    for i, blob in enumerate(net.params["l"]):
        blob.data[...] = seeded(blob.data.shape, 10 + i)
    run_and_check(net, params, seeded(shape, 1), seed=2)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_net_that_changes_shape_gets_new_primitives(caffe, tmp_path, engine):
    """Layer::Forward reshapes before every pass: a new batch or image size (pycaffe's
    reshape, a test net of another batch) must not reuse the old shape's primitives."""
    _, num_output, params = CASES["3x3_stride2_uneven"]
    net = make_net(caffe, tmp_path, input_text([(3, 4, 12, 11)]) + conv_text("l", num_output, params, engine), "r")
    for i, blob in enumerate(net.params["l"]):
        blob.data[...] = seeded(blob.data.shape, 20 + i)
    # the batch alone (pycaffe's deploy batch of 1), the image alone, both, and back
    for seed, shape in enumerate([(3, 4, 12, 11), (5, 4, 12, 11), (5, 4, 7, 9), (1, 4, 7, 9), (3, 4, 12, 11)]):
        net.blobs["x"].reshape(*shape)
        net.reshape()
        run_and_check(net, params, seeded(shape, 30 + seed), seed=40 + seed)


@pytest.mark.parametrize("engine", ENGINES)
def test_two_bottoms_share_the_weights_and_add_their_gradients(caffe, tmp_path, engine):
    shape, num_output, params = CASES["groups"]
    text = (input_text([shape, shape], names=("x", "z"))
            + conv_text("l", num_output, params, engine, bottoms=("x", "z"), tops=("y", "w")))
    net = make_net(caffe, tmp_path, text, "two")
    for i, blob in enumerate(net.params["l"]):
        blob.data[...] = seeded(blob.data.shape, 50 + i)
    x, z = seeded(shape, 51), seeded(shape, 52)
    net.blobs["x"].data[...], net.blobs["z"].data[...] = x, z
    net.forward()
    weight, bias = (b.data.astype(np.float64) for b in net.params["l"])
    dy, dw = seeded(net.blobs["y"].data.shape, 53), seeded(net.blobs["w"].data.shape, 54)
    y, dx, dweight_x, dbias_x = reference(x.astype(np.float64), weight, bias, params, dy.astype(np.float64))
    w, dz, dweight_z, dbias_z = reference(z.astype(np.float64), weight, bias, params, dw.astype(np.float64))
    assert_close(net.blobs["y"].data, y, "output of x")
    assert_close(net.blobs["w"].data, w, "output of z")
    net.blobs["y"].diff[...], net.blobs["w"].diff[...] = dy, dw
    for blob in net.params["l"]:
        blob.diff[...] = 0
    net._backward(len(net.layers) - 1, 0)
    assert_close(net.blobs["x"].diff, dx, "input gradient of x")
    assert_close(net.blobs["z"].diff, dz, "input gradient of z")
    assert_close(net.params["l"][0].diff, dweight_x + dweight_z, "weight gradient")
    assert_close(net.params["l"][1].diff, dbias_x + dbias_z, "bias gradient")


@pytest.mark.parametrize("engine", ENGINES)
def test_frozen_parameters_keep_their_diffs(caffe, tmp_path, engine):
    """lr_mult 0 (no param_propagate_down; force_backward would turn it on, so it is off
    here and the top is a loss, which is what makes Caffe run backward): the weight and bias
    diffs stay as they were, and the input gradient, which the learning layer below needs,
    is still computed."""
    shape, num_output, params = CASES["3x3_pad"]
    below = conv_text("a", 3, dict(pad=1), engine, tops=("h",))
    frozen = conv_text("l", num_output, params, engine, bottoms=("h",),
                       extra="param { lr_mult: 0 } param { lr_mult: 0 } loss_weight: 1")
    net = make_net(caffe, tmp_path, input_text([shape]).replace("force_backward: true\n", "") + below + frozen,
                   "frozen")
    for layer in ("a", "l"):
        for i, blob in enumerate(net.params[layer]):
            blob.data[...] = seeded(blob.data.shape, 60 + i)
    net.blobs["x"].data[...] = seeded(shape, 61)
    net.forward()
    h = net.blobs["h"].data.astype(np.float64)
    top_diff = seeded(net.blobs["y"].data.shape, 62)
    weight, bias = (b.data.astype(np.float64) for b in net.params["l"])
    _, dh, _, _ = reference(h, weight, bias, params, top_diff.astype(np.float64))
    net.blobs["y"].diff[...] = top_diff
    for blob in net.params["l"]:
        blob.diff[...] = 0.5
    net._backward(len(net.layers) - 1, 0)
    assert all((blob.diff == 0.5).all() for blob in net.params["l"])
    assert_close(net.blobs["h"].diff, dh, "input gradient")


@pytest.mark.parametrize("engine", ENGINES)
def test_a_first_layer_leaves_its_bottoms_diff(caffe, tmp_path, engine):
    """Without force_backward the Input needs no gradient: the layer (a loss top, so that
    Caffe runs its backward) computes its parameter gradients only, and the bottom's diff
    keeps what it held."""
    shape, num_output, params = CASES["3x3_pad"]
    net = make_net(caffe, tmp_path, input_text([shape]).replace("force_backward: true\n", "")
                   + conv_text("l", num_output, params, engine, extra="loss_weight: 1"), "first")
    for i, blob in enumerate(net.params["l"]):
        blob.data[...] = seeded(blob.data.shape, 70 + i)
    x = seeded(shape, 71)
    net.blobs["x"].data[...] = x
    net.forward()
    top_diff = seeded(net.blobs["y"].data.shape, 72)
    weight, bias = (b.data.astype(np.float64) for b in net.params["l"])
    _, _, dweight, dbias = reference(x.astype(np.float64), weight, bias, params, top_diff.astype(np.float64))
    net.blobs["y"].diff[...] = top_diff
    net.blobs["x"].diff[...] = 0.75
    for blob in net.params["l"]:
        blob.diff[...] = 0
    net._backward(len(net.layers) - 1, 0)
    assert (net.blobs["x"].diff == 0.75).all()
    assert_close(net.params["l"][0].diff, dweight, "weight gradient")
    assert_close(net.params["l"][1].diff, dbias, "bias gradient")


VERBOSE_RUNNER = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import pathlib
import test_conv_engine as t
from tinycaffe import caffe_env
caffe = caffe_env.import_caffe()
caffe.set_mode_cpu()
engine, force_nd = sys.argv[3], sys.argv[4] == "force_nd"
for name, (shape, num_output, params) in sorted(t.CASES.items()):
    params = dict(params, force_nd_im2col=force_nd)
    net = t.make_net(caffe, pathlib.Path(sys.argv[2]), t.input_text([shape]) + t.conv_text("l", num_output, params, engine),
                     name)
    net.blobs["x"].data[...] = t.seeded(shape, 1)
    net.forward()
    net.blobs["y"].diff[...] = 1
    net._backward(len(net.layers) - 1, 0)
"""


@pytest.mark.parametrize("engine,force_nd,runs", [("DEFAULT", "", 1), ("CAFFE", "", 0), ("DEFAULT", "force_nd", 0)])
def test_default_is_onednn_and_caffe_is_im2col(tmp_path, engine, force_nd, runs):
    """The reference checks above cover oneDNN's kernels only if DEFAULT runs them for every
    shape (a shape it refused would fall back to im2col and pass them silently): its verbose
    log lists every convolution it executes, one forward, backward-data and backward-weights
    per case. `engine: CAFFE` and `force_nd_im2col` run none."""
    env = dict(os.environ, DNNL_VERBOSE="1", ONEDNN_VERBOSE="1", GLOG_logtostderr="1", GLOG_minloglevel="1")
    proc = subprocess.run([sys.executable, "-c", VERBOSE_RUNNER, os.path.dirname(os.path.abspath(__file__)),
                           str(tmp_path), engine, force_nd], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    executed = collections.Counter(line.split(",")[5] for line in proc.stdout.splitlines()
                                   if line.startswith(("onednn_verbose,exec,cpu,convolution",
                                                       "dnnl_verbose,exec,cpu,convolution")))
    expected = {p: runs * len(CASES) for p in ("forward_training", "backward_data", "backward_weights") if runs}
    assert executed == expected, proc.stdout[-2000:]
    assert "oneDNN has no convolution" not in proc.stderr, proc.stderr[-2000:]


def test_the_cpu_build_links_onednn():
    location = caffe_env.read_location()
    if location.get("CAFFE_FLAVOUR") != "cpu":
        pytest.skip("the active build is %s" % location.get("CAFFE_FLAVOUR"))
    lib = os.path.join(location["CAFFE_ROOT"], "lib")
    libcaffe = [os.path.join(lib, n) for n in os.listdir(lib) if n.startswith("libcaffe.so")][0]
    ldd = subprocess.run(["ldd", libcaffe], capture_output=True, text=True).stdout
    assert "libdnnl.so" in ldd and "not found" not in ldd, ldd
