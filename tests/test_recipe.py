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
