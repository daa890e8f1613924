"""The modern recipe's pieces inside Caffe (issue 26): patch 0013's warmup and cosine lr_policy,
patch 0014's label smoothing in SoftmaxWithLoss, patch 0015's weight EMA in the solver, each
against a float64 reference of the PyTorch/TensorFlow rule it mirrors (real Caffe, CPU)."""
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format

from tinycaffe import caffe_env

pb2 = caffe_env.caffe_pb2()
GLOG_ENV = dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel="0")  # importing pycaffe quietens glog

# A small net with every kind of learnable blob: convolution weights and bias, BatchNorm's
# statistics (lr_mult 0), Scale, PReLU, InnerProduct.
BN_NET = """
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 8 dim: 3 dim: 8 dim: 8 } shape { dim: 8 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "uniform" min: 0 max: 2.99 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "prelu" type: "PReLU" bottom: "conv" top: "conv" }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def write_solver(folder, **fields):
    net = folder / "net.prototxt"
    net.write_text(BN_NET)
    solver = pb2.SolverParameter(net=str(net), base_lr=0.05, lr_policy="fixed", max_iter=30, display=1,
                                 momentum=0.9, snapshot_prefix=str(folder / "snap"),
                                 solver_mode=pb2.SolverParameter.CPU, random_seed=3)
    for key, value in fields.items():
        if isinstance(value, list):
            getattr(solver, key).extend(value)
        else:
            setattr(solver, key, value)
    path = folder / "solver.prototxt"
    path.write_text(text_format.MessageToString(solver))
    return str(path)


def logged_lrs(text):
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"Iteration (\d+), lr = ([-\d.e+]+)", text)}


# ---------------------------------------------------------------- patch 0013: warmup and cosine
def reference_lr(it, base, max_iter, policy, warmup=0, start=0.0, min_lr=0.0, gamma=0.1, stepsize=10):
    """torch's LinearLR(start_factor=start, total_iters=warmup) times the policy: CosineAnnealingLR
    (eta_min=min_lr, T_max=max_iter - warmup) stepped per iteration after the warmup, or Caffe's step."""
    if policy == "cosine":
        t = min(max(it - warmup, 0) / (max_iter - warmup), 1.0)
        rate = min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * t))
    elif policy == "step":
        rate = base * gamma ** (it // stepsize)
    else:
        rate = base
    if it < warmup:
        rate *= start + (1 - start) * it / warmup
    return rate


@pytest.mark.parametrize("fields", [
    dict(lr_policy="cosine", warmup_iter=5, warmup_start_factor=0.1, min_lr=0.001),
    dict(lr_policy="cosine"),
    dict(lr_policy="step", gamma=0.1, stepsize=10, warmup_iter=8),
    dict(lr_policy="fixed", warmup_iter=4, warmup_start_factor=0.25),
])
def test_the_logged_rate_is_the_reference_schedule(caffe_bin, tmp_path, fields):
    solver = write_solver(tmp_path, **fields)
    out = subprocess.run([caffe_bin, "train", "-solver", solver], capture_output=True, text=True,
                         env=GLOG_ENV)
    assert out.returncode == 0, out.stderr[-2000:]
    lrs = logged_lrs(out.stderr)
    assert sorted(lrs) == list(range(30))
    ref = {it: reference_lr(it, 0.05, 30, fields["lr_policy"], fields.get("warmup_iter", 0),
                            fields.get("warmup_start_factor", 0.0), fields.get("min_lr", 0.0)) for it in lrs}
    assert lrs == pytest.approx(ref, rel=2e-5, abs=1e-9)  # glog prints 6 significant digits


def test_torchs_own_schedulers_agree(tmp_path):
    torch = pytest.importorskip("torch")
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.05)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=25, eta_min=0.001)], milestones=[5])
    for it in range(30):
        assert opt.param_groups[0]["lr"] == pytest.approx(
            reference_lr(it, 0.05, 30, "cosine", 5, 0.1, 0.001), rel=1e-6)
        opt.step()
        sched.step()


def test_bad_schedules_are_caffes_one_line_checks(caffe_bin, tmp_path):
    for fields, message in ((dict(lr_policy="cosine", warmup_iter=30), "lr_policy cosine needs max_iter > warmup_iter"),
                            (dict(warmup_iter=3, warmup_start_factor=2.0), "warmup_start_factor must be in [0, 1]")):
        out = subprocess.run([caffe_bin, "train", "-solver", write_solver(tmp_path, **fields)], capture_output=True,
                             text=True, env=GLOG_ENV)
        assert out.returncode != 0 and message in out.stderr, out.stderr[-1500:]


# ---------------------------------------------------------------- patch 0014: label smoothing
def loss_net(tmp_path, classes, smoothing, ignore=None):
    param = "label_smoothing: %g" % smoothing + (" ignore_label: %d" % ignore if ignore is not None else "")
    path = tmp_path / "loss.prototxt"
    path.write_text("""force_backward: true
layer { name: "scores" type: "Input" top: "scores" input_param { shape { dim: 6 dim: %d } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 6 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "scores" bottom: "label" top: "loss" loss_param { %s } }
""" % (classes, param))
    return str(path)


def reference_smoothed(scores, labels, eps, ignore=None):
    """torch's cross_entropy(scores, labels, label_smoothing=eps, ignore_index=ignore) and its
    gradient, in float64: target (1 - eps) one-hot + eps / C, mean over the labels kept."""
    s = scores.astype(np.float64)
    logp = s - s.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    classes = s.shape[1]
    keep = labels != ignore if ignore is not None else np.ones(len(labels), bool)
    q = np.full_like(s, eps / classes)
    q[np.arange(len(labels)), np.where(keep, labels, 0)] += 1 - eps
    per = -(q * logp).sum(1)
    count = keep.sum()
    grad = (np.exp(logp) - q) * keep[:, None] / count
    return per[keep].sum() / count, grad


@pytest.mark.parametrize("eps, ignore", [(0.1, None), (0.0, None), (0.3, 2), (0.999, None)])
def test_label_smoothing_loss_and_gradient(caffe, tmp_path, eps, ignore):
    rng = np.random.RandomState(0)
    scores = rng.randn(6, 5).astype(np.float32) * 3
    labels = np.array([0, 1, 2, 3, 4, 2], np.float32)
    net = caffe.Net(loss_net(tmp_path, 5, eps, ignore), caffe.TRAIN)
    net.blobs["scores"].data[...] = scores
    net.blobs["label"].data[...] = labels
    loss = float(net.forward()["loss"])
    net.blobs["loss"].diff[...] = 1.0
    net.backward()
    want_loss, want_grad = reference_smoothed(scores, labels.astype(int), eps, ignore)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    np.testing.assert_allclose(net.blobs["scores"].diff, want_grad, rtol=1e-4, atol=1e-6)
    # finite differences of the layer's own loss (Caffe's GradientChecker method, central, float64 steps)
    h = 1e-2
    for i, c in [(0, 0), (3, 4), (5, 1)]:
        bumped = []
        for sign in (1, -1):
            x = scores.copy()
            x[i, c] += sign * h
            net.blobs["scores"].data[...] = x
            bumped.append(float(net.forward()["loss"]))
        assert (bumped[0] - bumped[1]) / (2 * h) == pytest.approx(float(want_grad[i, c]), abs=2e-3)


def test_label_smoothing_out_of_range_is_refused(caffe, tmp_path):
    out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, %r); import caffe; caffe.Net(%r, 1)"
                          % (os.path.dirname(os.path.dirname(caffe.__file__)), loss_net(tmp_path, 5, 1.0))],
                         capture_output=True, text=True, env=GLOG_ENV)
    assert out.returncode != 0 and "label_smoothing must be in [0, 1), got 1" in out.stderr, out.stderr[-1500:]


# ---------------------------------------------------------------- patch 0015: weight EMA
def flat_params(net):
    return [b.data.astype(np.float64).copy() for name in net.params for b in net.params[name]]


def test_ema_is_the_reference_average_and_survives_a_snapshot(caffe, tmp_path):
    decay = 0.9
    solver = caffe.get_solver(write_solver(tmp_path, ema_decay=decay, max_iter=20))
    assert not solver.has_ema  # it starts at the first step, from the weights then (after -weights)
    ema = flat_params(solver.net)
    for _ in range(12):
        solver.step(1)
        d = min(decay, (1.0 + solver.iter) / (10.0 + solver.iter))
        ema = [d * e + (1 - d) * w for e, w in zip(ema, flat_params(solver.net))]
    weights = flat_params(solver.net)
    solver.swap_ema()
    got = flat_params(solver.net)
    solver.swap_ema()
    assert all(np.allclose(g, e, rtol=1e-5, atol=1e-6) for g, e in zip(got, ema))
    assert all(np.array_equal(a, b) for a, b in zip(flat_params(solver.net), weights))  # swapped back exactly
    bn_mean = [name for name in solver.net.params].index("bn")
    assert not np.allclose(got[sum(len(solver.net.params[n]) for n in list(solver.net.params)[:bn_mean])],
                           weights[sum(len(solver.net.params[n]) for n in list(solver.net.params)[:bn_mean])])
    solver.snapshot()
    ema_file = tmp_path / "snap_iter_12_ema.caffemodel"
    assert ema_file.is_file() and (tmp_path / "snap_iter_12.caffemodel").is_file()
    saved = caffe.Net(str(tmp_path / "net.prototxt"), str(ema_file), caffe.TEST)
    assert all(np.allclose(a, b, rtol=1e-6) for a, b in zip(flat_params(saved), got))
    # A restore reads the average back: the next steps continue it as if never stopped.
    again = caffe.get_solver(write_solver(tmp_path, ema_decay=decay, max_iter=20))
    again.restore(str(tmp_path / "snap_iter_12.solverstate"))
    assert again.has_ema
    again.swap_ema()
    assert all(np.allclose(a, b, rtol=1e-6) for a, b in zip(flat_params(again.net), got))
    again.swap_ema()


def test_test_ema_tests_the_average(caffe, caffe_bin, tmp_path):
    """caffe train with test_ema: the val loss it logs at the end is the loss of the _ema.caffemodel
    it writes (on a test net of constant data), not the raw weights'."""
    solver = write_solver(tmp_path, ema_decay=0.8, test_ema=True, max_iter=10, test_iter=[1], test_interval=10)
    test_net = tmp_path / "test.prototxt"
    test_net.write_text(BN_NET.replace('data_filler { type: "gaussian" std: 1 } data_filler { type: "uniform" '
                                       'min: 0 max: 2.99 }', 'data_filler { type: "constant" value: 0.5 } '
                                       'data_filler { type: "constant" value: 1 }'))
    param = pb2.SolverParameter()
    text_format.Merge(open(solver).read(), param)
    param.train_net = param.net
    param.ClearField("net")
    param.test_net.append(str(test_net))
    open(solver, "w").write(text_format.MessageToString(param))
    out = subprocess.run([caffe_bin, "train", "-solver", solver], capture_output=True, text=True, env=GLOG_ENV)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Testing the moving average of the weights (test_ema)" in out.stderr
    logged = float(re.findall(r"Test net output #0: loss = ([-\d.e+]+)", out.stderr)[-1])

    def loss_of(weights):
        net = caffe.Net(str(test_net), weights, caffe.TEST)
        return float(net.forward()["loss"])
    assert logged == pytest.approx(loss_of(str(tmp_path / "snap_iter_10_ema.caffemodel")), rel=1e-5)
    assert logged != pytest.approx(loss_of(str(tmp_path / "snap_iter_10.caffemodel")), rel=1e-3)


# ---------------------------------------------------------------- gen_prototxt.py --recipe modern
def test_recipe_modern_writes_every_piece_and_says_where_from(repo, tmp_path):
    from conftest import make_sample_lmdbs
    lmdb = make_sample_lmdbs(tmp_path, train=12, seed=2)  # 120 train images: an epoch of 4 batches of 32
    out = subprocess.run([sys.executable, "tools/gen_prototxt.py", "--variants", "resnet_tiny", "--out",
                          str(tmp_path / "p"), "--lmdb-dir", lmdb, "--mode", "cpu", "--recipe", "modern",
                          "--max-iter", "40"], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    solver, net = pb2.SolverParameter(), pb2.NetParameter()
    text_format.Merge((tmp_path / "p" / "resnet_tiny" / "solver.prototxt").read_text(), solver)
    text_format.Merge((tmp_path / "p" / "resnet_tiny" / "train_val.prototxt").read_text(), net)
    assert (solver.type, solver.lr_policy, solver.warmup_iter, solver.min_lr) == ("Nesterov", "cosine", 4, 0)
    assert solver.warmup_start_factor == pytest.approx(0.1) and solver.test_ema
    assert solver.ema_decay == pytest.approx(1 - 1 / 10.0)  # 2 epochs of 4 iterations, at least 10
    assert not solver.stepvalue and not solver.HasField("gamma") and solver.weight_decay == pytest.approx(5e-4)
    loss = [layer for layer in net.layer if layer.type == "SoftmaxWithLoss"][0]
    assert loss.loss_param.label_smoothing == pytest.approx(0.1)
    scales = [layer for layer in net.layer if layer.type == "Scale"]
    assert scales and all([p.decay_mult for p in layer.param] == [0, 0] for layer in scales)
    decayed = {layer.name for layer in net.layer for p in layer.param if p.decay_mult}
    assert decayed and all(net_layer.type in ("Convolution", "InnerProduct")
                           for net_layer in net.layer if net_layer.name in decayed)
    assert "# recipe modern (--recipe modern): warmup 1 epoch(s)" in (
        tmp_path / "p" / "resnet_tiny" / "solver.prototxt").read_text()
    # It trains, on both engines: the val numbers are the moving average's, and it is what evaluate is told.
    for engine in ("binary", "pycaffe"):
        run = subprocess.run(["bash", "scripts/train.sh", str(tmp_path / "p" / "resnet_tiny" / "solver.prototxt"),
                              "--gpu", "cpu", "--engine", engine, "--runs-root", str(tmp_path / engine)],
                             cwd=repo, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        run_dir = os.path.join(str(tmp_path / engine), "resnet_tiny", os.listdir(tmp_path / engine / "resnet_tiny")[0])
        assert os.path.isfile(os.path.join(run_dir, "snapshots", "resnet_tiny_iter_40_ema.caffemodel"))
        assert run.stderr.strip().splitlines()[-1].endswith("resnet_tiny_iter_40_ema.caffemodel --lmdb %s"
                                                            % os.path.join(lmdb, "val_lmdb"))
        log = open(os.path.join(run_dir, "caffe.log")).read()
        assert "lr = 0.01" in log  # iteration 0 of the warmup: 0.1 x base_lr 0.1


# ---------------------------------------------------------------- patch 0016: mixup and CutMix
def mixup_net(tmp_path, num=8, shape=(3, 6, 5), **param):
    fields = " ".join("%s: %g" % item for item in param.items())
    path = tmp_path / "mixup.prototxt"
    path.write_text("""force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: %d dim: %d dim: %d dim: %d } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: %d } } }
layer { name: "mixup" type: "Mixup" bottom: "data" bottom: "label" top: "data" top: "label_mix" top: "lambda"
  mixup_param { %s } }
""" % ((num,) + tuple(shape) + (num, fields)))
    return str(path)


def mixed_batches(caffe, path, draws, seed=1, phase=None):
    """(input, output, partner labels, lambda) for `draws` forward passes of the Mixup net; the
    labels are 0..N-1, so the partner labels are the partners' indices."""
    caffe.set_random_seed(seed)
    net = caffe.Net(path, caffe.TRAIN if phase is None else phase)
    rng = np.random.RandomState(seed)
    num = net.blobs["label"].data.shape[0]
    out = []
    for _ in range(draws):
        x = rng.randn(*net.blobs["data"].data.shape).astype(np.float32)
        net.blobs["data"].data[...] = x
        net.blobs["label"].data[...] = np.arange(num)
        net.forward()
        out.append((x, net.blobs["data"].data.copy(), net.blobs["label_mix"].data.astype(int).copy(),
                    float(net.blobs["lambda"].data[0])))
    return out


def test_mixup_blends_each_image_with_its_partner(caffe, tmp_path):
    for x, y, partner, lam in mixed_batches(caffe, mixup_net(tmp_path, alpha=0.4), 20):
        assert sorted(partner) == list(range(8)) and 0 < lam < 1  # a permutation; Beta never gives 0 or 1
        np.testing.assert_allclose(y, lam * x + (1 - lam) * x[partner], rtol=1e-5, atol=1e-6)


def box_of(x, y, partner):
    """The rectangle where the images took their partners' pixels (one for the batch), as slices,
    checked to hold exactly the partner's pixels inside and the image's own outside."""
    moved = [i for i in range(len(x)) if partner[i] != i]
    inside = np.all([y[i] == x[partner[i]] for i in moved], axis=(0, 1))  # H x W
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    if not len(rows):
        return slice(0, 0), slice(0, 0)
    box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    for i in range(len(x)):
        expect = x[i].copy()
        expect[:, box[0], box[1]] = x[partner[i], :, box[0], box[1]]
        np.testing.assert_array_equal(y[i], expect)
    return box


def test_cutmix_pastes_one_box_and_lambda_is_its_area(caffe, tmp_path):
    areas = []
    for x, y, partner, lam in mixed_batches(caffe, mixup_net(tmp_path, shape=(2, 9, 7), alpha=0, cutmix_alpha=1),
                                            40):
        rows, cols = box_of(x, y, partner)
        area = (rows.stop - rows.start) * (cols.stop - cols.start)
        assert lam == pytest.approx(1 - area / 63.0, abs=1e-7)  # the clipped box's area, as Yun et al.
        areas.append(area)
    assert len(set(areas)) > 10 and max(areas) > 20  # boxes of many sizes, some large


def test_lambda_follows_beta_and_prob_and_switch(caffe, tmp_path):
    draws = mixed_batches(caffe, mixup_net(tmp_path, num=4, shape=(1, 4, 4), alpha=0.4), 600)
    lams = np.array([d[3] for d in draws])
    reference = np.sort(np.random.RandomState(0).beta(0.4, 0.4, 200000))
    ks = np.max(np.abs(np.searchsorted(reference, np.sort(lams)) / len(reference) - np.arange(1, 601) / 600.0))
    # Kolmogorov-Smirnov distance to Beta(0.4, 0.4): 1% critical value at n=600 is 0.067; the draws are seeded, so
    # the margin only keeps another seed's draw from failing (seeds 1-3 give 0.026-0.048), a wrong law gives > 0.1
    assert ks < 0.08, ks
    draws = mixed_batches(caffe, mixup_net(tmp_path, num=4, shape=(1, 6, 6), alpha=0.4, cutmix_alpha=1,
                                           prob=0.5, switch_prob=0.5), 400)
    untouched = sum(d[3] == 1 and np.array_equal(d[0], d[1]) and list(d[2]) == [0, 1, 2, 3] for d in draws)
    cut = sum(d[3] < 1 and np.isin(d[1], d[0]).all() for d in draws)  # every pixel someone's own: CutMix
    assert 160 < untouched < 240 and 60 < cut < 140, (untouched, cut)


def test_the_solvers_seed_decides_the_draws_and_test_passes_through(caffe, tmp_path):
    path = mixup_net(tmp_path, alpha=0.2, cutmix_alpha=1)
    lams = [[d[3] for d in mixed_batches(caffe, path, 6, seed=seed)] for seed in (1, 1, 2)]
    assert lams[0] == lams[1] and lams[0] != lams[2]
    for x, y, partner, lam in mixed_batches(caffe, path, 3, phase=caffe.TEST):
        assert lam == 1 and list(partner) == list(range(8)) and np.array_equal(x, y)


def test_mixup_backward_is_the_blend_transposed(caffe, tmp_path):
    """d(sum w * out)/dx for the draw the forward made: the diff blended with the inverse partners."""
    rng = np.random.RandomState(7)
    for param in (dict(alpha=0.4), dict(cutmix_alpha=1)):
        caffe.set_random_seed(2)
        net = caffe.Net(mixup_net(tmp_path, shape=(2, 7, 6), **param), caffe.TRAIN)
        for _ in range(5):
            x = rng.randn(*net.blobs["data"].data.shape).astype(np.float32)
            net.blobs["data"].data[...] = x
            net.blobs["label"].data[...] = np.arange(8)
            net.forward()
            y, partner, lam = net.blobs["data"].data.copy(), net.blobs["label_mix"].data.astype(int), \
                float(net.blobs["lambda"].data[0])
            w = rng.randn(*x.shape).astype(np.float32)
            net.blobs["data"].diff[...] = w  # in place: the top's diff is the data's
            net.backward()
            if "alpha" in param:
                want = lam * w.astype(np.float64)
                np.add.at(want, partner, (1 - lam) * w)
            else:
                rows, cols = box_of(x, y, partner)
                inside = np.zeros(x.shape[2:], bool)
                inside[rows, cols] = True
                want = w.astype(np.float64) * ~inside
                np.add.at(want, partner, w * inside)
            np.testing.assert_allclose(net.blobs["data"].diff, want, rtol=1e-5, atol=1e-6)


def test_mixup_after_a_layer_with_weights_trains(caffe_bin, tmp_path):
    """Manifold mixup: the Mixup layer after a convolution; the loss takes the partner labels and
    lambda as constants, and the convolution learns through the blend."""
    net = tmp_path / "manifold.prototxt"
    net.write_text("""
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 8 dim: 3 dim: 8 dim: 8 } shape { dim: 8 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "uniform" min: 0 max: 2.99 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "mixup" type: "Mixup" bottom: "conv" bottom: "label" top: "conv" top: "label_mix" top: "lambda"
  mixup_param { alpha: 0.4 cutmix_alpha: 1 } }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" bottom: "label_mix" bottom: "lambda"
  top: "loss" }
""")
    solver = pb2.SolverParameter(net=str(net), base_lr=0.1, lr_policy="fixed", max_iter=6, display=1,
                                 snapshot_prefix=str(tmp_path / "m"), solver_mode=pb2.SolverParameter.CPU,
                                 random_seed=1, debug_info=True)
    (tmp_path / "solver.prototxt").write_text(text_format.MessageToString(solver))
    out = subprocess.run([caffe_bin, "train", "-solver", str(tmp_path / "solver.prototxt")], capture_output=True,
                         text=True, env=GLOG_ENV)
    assert out.returncode == 0, out.stderr[-2000:]
    conv_diffs = [float(v) for v in re.findall(r"\[Backward\] Layer conv, param blob 0 diff: ([-\d.e+]+)", out.stderr)]
    assert len(conv_diffs) == 6 and all(d > 0 for d in conv_diffs)  # the gradient reaches the convolution


def test_mixup_param_defaults_to_nothing_but_what_is_set(caffe, tmp_path):
    """cutmix_alpha alone is CutMix alone (alpha defaults to 0); nothing set is refused."""
    draws = mixed_batches(caffe, mixup_net(tmp_path, num=4, shape=(1, 6, 6), cutmix_alpha=1), 40)
    assert all(np.isin(d[1], d[0]).all() for d in draws)  # every pixel someone's own: never a blend
    out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, %r); import caffe; caffe.Net(%r, 0)"
                          % (os.path.dirname(os.path.dirname(caffe.__file__)), mixup_net(tmp_path))],
                         capture_output=True, text=True, env=GLOG_ENV)
    assert out.returncode != 0 and "alpha and cutmix_alpha are both 0 (nothing to mix" in out.stderr


def mixed_loss_net(tmp_path, smoothing):
    path = tmp_path / "mixed_loss.prototxt"
    path.write_text("""force_backward: true
layer { name: "scores" type: "Input" top: "scores" input_param { shape { dim: 6 dim: 5 } } }
layer { name: "labels" type: "Input" top: "label" top: "label_mix" top: "lambda"
  input_param { shape { dim: 6 } shape { dim: 6 } shape { dim: 1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "scores" bottom: "label" bottom: "label_mix"
  bottom: "lambda" top: "loss" loss_param { label_smoothing: %g } }
""" % smoothing)
    return str(path)


@pytest.mark.parametrize("lam, smoothing", [(0.3, 0.0), (0.8, 0.1), (1.0, 0.1), (0.0, 0.0)])
def test_the_mixed_loss_is_lambda_blend_of_both_labels(caffe, tmp_path, lam, smoothing):
    rng = np.random.RandomState(3)
    scores = rng.randn(6, 5).astype(np.float32) * 3
    labels, partners = np.array([0, 1, 2, 3, 4, 2]), np.array([4, 1, 0, 2, 2, 3])
    net = caffe.Net(mixed_loss_net(tmp_path, smoothing), caffe.TRAIN)
    net.blobs["scores"].data[...] = scores
    net.blobs["label"].data[...] = labels
    net.blobs["label_mix"].data[...] = partners
    net.blobs["lambda"].data[...] = lam
    loss = float(net.forward()["loss"])
    net.blobs["loss"].diff[...] = 1.0
    net.backward()
    loss_a, grad_a = reference_smoothed(scores, labels, smoothing)
    loss_b, grad_b = reference_smoothed(scores, partners, smoothing)
    assert loss == pytest.approx(lam * loss_a + (1 - lam) * loss_b, rel=1e-5)
    np.testing.assert_allclose(net.blobs["scores"].diff, lam * grad_a + (1 - lam) * grad_b, rtol=1e-4, atol=1e-6)
    if lam == 0.0:  # lambda outside [0, 1] is refused
        code = ("import sys; sys.path.insert(0, %r); import caffe; n = caffe.Net(%r, 1); "
                "n.blobs['lambda'].data[...] = 1.5; n.forward()"
                % (os.path.dirname(os.path.dirname(caffe.__file__)), mixed_loss_net(tmp_path, smoothing)))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=GLOG_ENV)
        assert out.returncode != 0 and "lambda (bottom 4) must be in [0, 1], got 1.5" in out.stderr
    if lam == 1.0:  # exactly the 2-bottom loss, the partner labels unread
        plain = caffe.Net(loss_net(tmp_path, 5, smoothing), caffe.TRAIN)
        plain.blobs["scores"].data[...] = scores
        plain.blobs["label"].data[...] = labels
        assert float(plain.forward()["loss"]) == loss


@pytest.mark.parametrize("param, message", [
    (dict(alpha=-1), "mixup_param.alpha must be >= 0 (0: no mixup), got -1"),
    (dict(alpha=0, cutmix_alpha=0), "alpha and cutmix_alpha are both 0"),
    (dict(alpha=0.2, prob=1.5), "mixup_param.prob must be in [0, 1], got 1.5"),
])
def test_bad_mixup_params_are_one_line_checks(caffe, tmp_path, param, message):
    out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, %r); import caffe; caffe.Net(%r, 0)"
                          % (os.path.dirname(os.path.dirname(caffe.__file__)), mixup_net(tmp_path, **param))],
                         capture_output=True, text=True, env=GLOG_ENV)
    assert out.returncode != 0 and message in out.stderr, out.stderr[-1500:]


def test_gen_mixup_and_cutmix_train_on_both_engines(repo, tmp_path):
    from conftest import make_sample_lmdbs
    lmdb = make_sample_lmdbs(tmp_path, train=12, seed=2)
    out = subprocess.run([sys.executable, "tools/gen_prototxt.py", "--variants", "tiny", "--out",
                          str(tmp_path / "p"), "--lmdb-dir", lmdb, "--mode", "cpu", "--mixup", "0.2",
                          "--cutmix", "1", "--max-iter", "12", "--test-interval", "6"],
                         cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "p" / "tiny" / "train_val.prototxt").read_text()
    assert ", mixup 0.2, cutmix 1." in text
    net = pb2.NetParameter()
    text_format.Merge(text, net)
    order = [layer.type for layer in net.layer]
    mixup = net.layer[order.index("Mixup")]
    assert order[:3] == ["Data", "Data", "Mixup"] and list(mixup.bottom) == ["data", "label"]
    assert list(mixup.top) == ["data", "label_mix", "mix_lambda"]
    assert (mixup.mixup_param.alpha, mixup.mixup_param.cutmix_alpha) == (pytest.approx(0.2), 1)
    loss = net.layer[order.index("SoftmaxWithLoss")]
    assert list(loss.bottom)[1:] == ["label", "label_mix", "mix_lambda"]
    assert "Mixup" not in (tmp_path / "p" / "tiny" / "deploy.prototxt").read_text()
    for engine in ("binary", "pycaffe"):
        run = subprocess.run(["bash", "scripts/train.sh", str(tmp_path / "p" / "tiny" / "solver.prototxt"),
                              "--gpu", "cpu", "--engine", engine, "--runs-root", str(tmp_path / engine)],
                             cwd=repo, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
    for flag, value in (("--mixup", "-0.5"), ("--cutmix", "1e40"), ("--mixup", "nan")):
        bad = subprocess.run([sys.executable, "tools/gen_prototxt.py", "--variants", "tiny", "--out",
                              str(tmp_path / "q"), flag, value], cwd=repo, capture_output=True, text=True)
        assert bad.returncode == 1 and bad.stderr.strip().endswith(
            "%s must be a finite alpha >= 0 (0: off), got %s" % (flag, float(value))), bad.stderr
    assert not (tmp_path / "q").exists()
