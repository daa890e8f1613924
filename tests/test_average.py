"""tools/average_weights.py and tinycaffe/average.py: checkpoint averaging on real .caffemodel
files written by Caffe, read back by pycaffe."""
import json
import os
import subprocess
import sys

import numpy as np
from google.protobuf import text_format

from conftest import make_sample_lmdbs
from tinycaffe import average, caffe_env

pb2 = caffe_env.caffe_pb2()
NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 5 dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 1 }
  bias_filler { type: "gaussian" std: 1 } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" batch_norm_param { use_global_stats: true } }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
  inner_product_param { num_output: %d weight_filler { type: "gaussian" std: 1 } } }
"""


def snapshot(caffe, tmp_path, name, seed, factor, classes=3):
    """A .caffemodel with random weights and BatchNorm sums for running mean/var of weight `factor`."""
    net_path = tmp_path / ("net%d.prototxt" % classes)
    net_path.write_text(NET % classes)
    caffe.set_random_seed(seed)
    net = caffe.Net(str(net_path), caffe.TEST)
    rng = np.random.RandomState(seed)
    mean, var = rng.randn(4), rng.rand(4) + 0.5
    net.params["bn"][0].data[...] = mean * factor
    net.params["bn"][1].data[...] = var * factor
    net.params["bn"][2].data[...] = factor
    net.params["scale"][0].data[...] = rng.rand(4) + 0.5
    path = str(tmp_path / name)
    net.save(path)
    return path, net, mean, var


def test_the_average_is_every_weights_mean_and_batchnorms_mean_statistics(caffe, tmp_path):
    made = [snapshot(caffe, tmp_path, "m%d.caffemodel" % i, seed=i, factor=f) for i, f in enumerate((1.0, 999.0, 30.0))]
    out = str(tmp_path / "avg.caffemodel")
    average.write_average([m[0] for m in made], out)
    net = caffe.Net(str(tmp_path / "net3.prototxt"), out, caffe.TEST)
    for layer in ("conv", "scale", "fc"):
        for i, blob in enumerate(net.params[layer]):
            want = np.mean([m[1].params[layer][i].data.astype(np.float64) for m in made], axis=0)
            np.testing.assert_allclose(blob.data, want, rtol=1e-6, atol=1e-7)
    bn = net.params["bn"]
    assert bn[2].data[0] == 1.0  # statistics, not Caffe's sums: snapshots with other factors average right
    np.testing.assert_allclose(bn[0].data, np.mean([m[2] for m in made], axis=0), rtol=1e-6)
    np.testing.assert_allclose(bn[1].data, np.mean([m[3] for m in made], axis=0), rtol=1e-6)
    # Caffe runs the averaged net with those statistics: BatchNorm in TEST is (x - mean) / sqrt(var + eps).
    x = np.random.RandomState(9).randn(2, 3, 5, 5).astype(np.float32)
    net.blobs["data"].data[...] = x
    conv_only = caffe.Net(str(tmp_path / "net3.prototxt"), out, caffe.TEST)
    conv_only.blobs["data"].data[...] = x
    conv_only.forward(end="conv")  # the conv output before BatchNorm (in place: read it at the conv step)
    raw = conv_only.blobs["conv"].data.copy()
    net.forward(end="bn")
    normalised = (raw - bn[0].data[None, :, None, None]) / np.sqrt(bn[1].data[None, :, None, None] + 1e-5)
    np.testing.assert_allclose(net.blobs["conv"].data, normalised, rtol=1e-4, atol=1e-5)
    record = json.load(open(out + ".json"))
    assert [os.path.basename(p) for p in record["averaged"]] == ["m0.caffemodel", "m1.caffemodel", "m2.caffemodel"]


def test_models_of_different_nets_are_refused_naming_the_file(caffe, tmp_path, repo):
    a = snapshot(caffe, tmp_path, "a.caffemodel", 1, 1.0)[0]
    b = snapshot(caffe, tmp_path, "b.caffemodel", 2, 1.0, classes=5)[0]
    out = subprocess.run([sys.executable, "tools/average_weights.py", "--models", a, b, "--out",
                          str(tmp_path / "o.caffemodel")], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().endswith(
        "%s: its layers or blob shapes differ from %s's (expected snapshots of one net)" % (b, a)), out.stderr
    assert not os.path.exists(tmp_path / "o.caffemodel") and not os.path.exists(tmp_path / "o.caffemodel.tmp")
    junk = tmp_path / "junk.caffemodel"
    junk.write_bytes(b"\xff\xff not a protobuf")
    out = subprocess.run([sys.executable, "tools/average_weights.py", "--models", a, str(junk), "--out",
                          str(tmp_path / "o.caffemodel")], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 1 and ("%s: not a .caffemodel" % junk) in out.stderr, out.stderr
    out = subprocess.run([sys.executable, "tools/average_weights.py", str(tmp_path / "nowhere")], cwd=repo,
                         capture_output=True, text=True)
    assert out.returncode == 1 and "RUN_DIR %s: no such directory" % (tmp_path / "nowhere") in out.stderr


def test_a_runs_last_snapshots_averaged_and_evaluated(repo, tmp_path, caffe):
    lmdb = make_sample_lmdbs(tmp_path, train=12, seed=4)
    gen = subprocess.run([sys.executable, "tools/gen_prototxt.py", "--variants", "tiny", "--out", str(tmp_path / "p"),
                          "--lmdb-dir", lmdb, "--mode", "cpu", "--max-iter", "12", "--test-interval", "12"],
                         cwd=repo, capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr
    solver_path = tmp_path / "p" / "tiny" / "solver.prototxt"
    solver = text_format.Merge(solver_path.read_text(), pb2.SolverParameter())
    solver.snapshot = 4
    solver_path.write_text(text_format.MessageToString(solver))
    run = subprocess.run(["bash", "scripts/train.sh", str(solver_path), "--gpu", "cpu", "--runs-root",
                          str(tmp_path / "runs")], cwd=repo, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    run_dir = os.path.join(str(tmp_path / "runs"), "tiny", os.listdir(tmp_path / "runs" / "tiny")[0])
    out = subprocess.run([sys.executable, "tools/average_weights.py", run_dir, "--last", "2"], cwd=repo,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    averaged = os.path.join(run_dir, "averaged_last2.caffemodel")
    assert json.load(open(averaged + ".json"))["iterations"] == [8, 12]
    snaps = [caffe.Net(os.path.join(run_dir, "deploy.prototxt"), os.path.join(run_dir, "snapshots",
                                                                             "tiny_iter_%d.caffemodel" % i), caffe.TEST)
             for i in (8, 12)]
    avg = caffe.Net(os.path.join(run_dir, "deploy.prototxt"), averaged, caffe.TEST)
    for layer in avg.params:
        for i, blob in enumerate(avg.params[layer]):  # weights and biases
            np.testing.assert_allclose(blob.data, (snaps[0].params[layer][i].data.astype(np.float64)
                                                   + snaps[1].params[layer][i].data) / 2, rtol=1e-6, atol=1e-8)
    command = out.stdout.strip().splitlines()[-1]
    assert command.startswith("next: .venv/bin/python tools/evaluate.py --deploy ")
    evaluated = subprocess.run([sys.executable] + command.split()[2:] + ["--quiet"], cwd=repo, capture_output=True,
                               text=True)
    assert evaluated.returncode == 0 and "top-1" in evaluated.stdout, evaluated.stderr[-1500:]
    many = average_tool(repo, run_dir, "--last", "9", "--out", os.path.join(run_dir, "all.caffemodel"))
    assert many.returncode == 0 and "averaged 3 models (--last 9: the run has 3)" in many.stdout, many.stderr
    no_ema = subprocess.run([sys.executable, "tools/average_weights.py", run_dir, "--ema"], cwd=repo,
                            capture_output=True, text=True)
    assert no_ema.returncode == 1 and "0 moving averages (*_ema.caffemodel, from a solver with ema_decay)" \
        in no_ema.stderr


def average_tool(repo, *args):
    return subprocess.run([sys.executable, "tools/average_weights.py"] + [str(a) for a in args], cwd=repo,
                          capture_output=True, text=True)


def test_odd_inputs_are_one_line_and_write_nothing(caffe, tmp_path, repo):
    a = snapshot(caffe, tmp_path, "a.caffemodel", 1, 1.0)[0]
    b = snapshot(caffe, tmp_path, "b.caffemodel", 2, 1.0)[0]
    empty = tmp_path / "empty.caffemodel"
    empty.write_bytes(b"")
    hdf5 = tmp_path / "h.caffemodel.h5"
    hdf5.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    out = tmp_path / "o.caffemodel"
    cases = [
        ((str(empty), a), "%s: no layer with weights (expected a .caffemodel that Caffe saved)" % empty),
        ((a, str(empty)), "%s: no layer with weights" % empty),
        ((a, a), "%s: given more than once (each model counts once in the average)" % a),
        ((a, str(hdf5)), "%s: an HDF5 snapshot; this tool reads .caffemodel files" % hdf5),
    ]
    for models, needle in cases:
        result = average_tool(repo, "--models", *models, "--out", out)
        assert result.returncode == 1 and needle in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
            result.stderr
    result = average_tool(repo, "--models", a, b, "--out", tmp_path / "missing" / "o.caffemodel")
    assert result.returncode == 1 and "--out %s: folder %s does not exist" % (
        tmp_path / "missing" / "o.caffemodel", tmp_path / "missing") in result.stderr
    for flags in (["--last", "3"], ["--ema"]):
        result = average_tool(repo, "--models", a, b, "--out", out, *flags)
        assert result.returncode == 1 and "with --models, name the files to average" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["a.caffemodel", "b.caffemodel", "empty.caffemodel", "h.caffemodel.h5",
                                            "net3.prototxt"]

