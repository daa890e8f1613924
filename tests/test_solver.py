"""Solver messages: the paper's values, both schedules, all three types, accepted by Caffe."""
import itertools
import os

import pytest

from tinycaffe import gen, solver
from tinycaffe.caffe_env import caffe_pb2


@pytest.mark.parametrize("schedule, kind", list(itertools.product(solver.SCHEDULES, solver.SOLVER_TYPES)))
def test_solver_values(schedule, kind):
    s = solver.make_solver("net.prototxt", "runs/x/x", 10000, schedule, kind, "gpu")
    assert (s.base_lr, s.lr_policy, s.gamma) == (pytest.approx(0.01), "step", pytest.approx(0.1))
    assert s.stepsize == {"fast": 5000, "alexnet": 100000}[schedule]
    assert s.type == {"sgd": "SGD", "nesterov": "Nesterov", "adagrad": "AdaGrad"}[kind]
    assert s.momentum == (0 if kind == "adagrad" else pytest.approx(0.9))
    assert s.weight_decay == pytest.approx(5e-4)
    assert list(s.test_iter) == [100] and s.solver_mode == caffe_pb2().SolverParameter.GPU
    assert s.max_iter > s.stepsize and s.snapshot_prefix == "runs/x/x"


@pytest.mark.parametrize("val, batch, iters", [(10000, 100, 100), (200, 100, 2), (12, 12, 1), (47, 47, 1), (150, 75, 2)])
def test_test_iter_covers_val_exactly_once(val, batch, iters):
    assert solver.test_batch_for(val) == batch
    s = solver.make_solver("n", "p", val)
    assert list(s.test_iter) == [iters] and iters * batch == val


def test_cpu_mode_and_max_iter_override():
    s = solver.make_solver("n", "p", 100, mode="cpu", max_iter=7)
    assert s.solver_mode == caffe_pb2().SolverParameter.CPU and s.max_iter == 7


@pytest.mark.parametrize("kind", list(solver.SOLVER_TYPES))
def test_caffe_accepts_each_solver_type(caffe, tmp_path, monkeypatch, kind):
    """Caffe builds the solver (AdaGrad would abort if momentum were set) and steps once."""
    from tinycaffe import data, sample_data
    ds = str(tmp_path / "ds")
    sample_data.generate(ds, classes=5, train=2, val=2, test=1, seed=1)
    data.make_lmdbs(ds, str(tmp_path / "lmdb"), workers=1, splits=["train", "val"])
    cfg = gen.GenConfig(out=str(tmp_path / "prototxt"), lmdb_dir=str(tmp_path / "lmdb"), batch_size=2,
                        solver=kind, mode="cpu", num_classes=5, val_size=10, max_iter=2)
    gen.generate(["tiny"], cfg)
    os.makedirs(tmp_path / "runs" / "tiny")
    monkeypatch.chdir(tmp_path)  # snapshot_prefix is relative to where caffe runs
    s = caffe.get_solver(os.path.join(cfg.out, "tiny", "solver.prototxt"))
    s.step(1)
    assert s.iter == 1 and s.net.blobs["loss"].data > 0


@pytest.mark.parametrize("bad, needle", [
    (dict(schedule="slow"), "unknown schedule 'slow' (valid: fast, alexnet)"),
    (dict(solver_type="adam"), "unknown solver 'adam' (valid: sgd, nesterov, adagrad)"),
    (dict(mode="tpu"), "unknown mode 'tpu' (valid: gpu, cpu)"),
])
def test_bad_choices_list_valid_ones(bad, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        solver.make_solver("n", "p", 100, **bad)


@pytest.mark.parametrize("schedule, steps", [("fast", [10000, 15000]), ("alexnet", [225000, 337500])])
def test_batchnorm_families_get_their_recipe(schedule, steps):
    """ResNet/Inception: SGD momentum 0.9 from LR 0.1, /10 at 50% and 75% of the schedule's run."""
    s = solver.make_solver("net.prototxt", "runs/x/x", 10000, schedule, "sgd", "gpu", family="bn")
    assert (s.base_lr, s.lr_policy, list(s.stepvalue), s.gamma) == (pytest.approx(0.1), "multistep", steps,
                                                                     pytest.approx(0.1))
    assert s.momentum == pytest.approx(0.9) and s.weight_decay == pytest.approx(5e-4) and not s.HasField("stepsize")
    with pytest.raises(ValueError, match="unknown solver family 'x' \\(valid: paper, bn\\)"):
        solver.make_solver("net.prototxt", "runs/x/x", 10000, family="x")


def test_lr_scale_multiplies_the_familys_rate_and_resnet_tiny_uses_it():
    """resnet_tiny trains at 4x the BN recipe (0.1 at batch 32): measured to beat tiny in tiny's budget."""
    s = solver.make_solver("net.prototxt", "runs/x/x", 10000, family="bn", batch=32, lr_scale=4.0)
    assert s.base_lr == pytest.approx(0.1)
    assert solver.make_solver("net.prototxt", "runs/x/x", 10000, family="bn", batch=32).base_lr == pytest.approx(0.025)
    assert solver.make_solver("net.prototxt", "runs/x/x", 10000, lr_scale=2.0).base_lr == pytest.approx(0.02)
    from tinycaffe import nets
    assert nets.variant("resnet_tiny").lr_scale == 4.0
    assert {v.lr_scale for n, v in nets.VARIANTS.items() if n != "resnet_tiny"} == {1.0}
