"""Solvers as caffe_pb2.SolverParameter messages (never hand-quoted strings)."""
from google.protobuf import text_format

from .caffe_env import caffe_pb2

# ---------------------------------------------------------------- defaults (the paper's unless noted)
BASE_LR = 0.01  # the paper's and AlexNet's starting learning rate
GAMMA = 0.1  # "step": divide the LR by 10 at every step
MOMENTUM = 0.9  # SGD and Nesterov; AdaGrad takes none (Caffe refuses momentum with it)
WEIGHT_DECAY = 5e-4  # AlexNet's
DISPLAY = 20  # iterations between loss lines in the log
MAX_TEST_BATCH = 100  # largest TEST batch; the real one divides the val size exactly
RANDOM_SEED = 0  # fillers, dropout and crops reproducible; change it for ensemble members
SCHEDULES = {  # stepsize: iterations per LR/10; max_iter; test_interval; snapshot
    "fast": dict(stepsize=5000, max_iter=20000, test_interval=1000, snapshot=5000),  # the paper's exploring schedule
    "alexnet": dict(stepsize=100000, max_iter=450000, test_interval=1000, snapshot=10000),  # bvlc_alexnet's
}
# The recipe BatchNorm nets (ResNet, Inception) are known to train with: LR 0.1 divided by 10
# at 50% and 75% of the run (He et al. 2016; fb.resnet.torch's CIFAR/ImageNet recipes).
BN_BASE_LR = 0.1  # at batch 128; other batches scale it linearly (Goyal et al. 2017)
BN_BATCH = 128
BN_STEPS = (0.5, 0.75)  # fractions of max_iter where the LR drops 10x ("multistep")
FAMILIES = ("paper", "bn")  # nets.Variant.solver_family
SOLVER_TYPES = {"sgd": "SGD", "nesterov": "Nesterov", "adagrad": "AdaGrad"}
MODES = {"gpu": "GPU", "cpu": "CPU"}


def test_batch_for(val_count, limit=MAX_TEST_BATCH):
    """The largest batch <= limit dividing val_count, so test_iter x batch covers val exactly once."""
    if val_count < 1:
        raise ValueError("val size must be >= 1, got %d" % val_count)
    return max(b for b in range(1, min(limit, val_count) + 1) if val_count % b == 0)


def make_solver(net_path, snapshot_prefix, val_count, schedule="fast", solver_type="sgd", mode="gpu",
                max_iter=None, seed=RANDOM_SEED, test_interval=None, family="paper", batch=BN_BATCH, lr_scale=1.0,
                weight_decay=None):
    """A SolverParameter for train_val at net_path. test_iter = val_count / test batch.
    family "paper": the paper's step schedule from 0.01; "bn": multistep from 0.1 x batch/128,
    /10 at 50% and 75% of max_iter (the schedule's length). lr_scale multiplies the base LR;
    weight_decay None is AlexNet's WEIGHT_DECAY."""
    if family not in FAMILIES:
        raise ValueError("unknown solver family '%s' (valid: %s)" % (family, ", ".join(FAMILIES)))
    if schedule not in SCHEDULES:
        raise ValueError("unknown schedule '%s' (valid: %s)" % (schedule, ", ".join(SCHEDULES)))
    if solver_type not in SOLVER_TYPES:
        raise ValueError("unknown solver '%s' (valid: %s)" % (solver_type, ", ".join(SOLVER_TYPES)))
    if mode not in MODES:
        raise ValueError("unknown mode '%s' (valid: %s)" % (mode, ", ".join(MODES)))
    pb2 = caffe_pb2()
    plan = SCHEDULES[schedule]
    s = pb2.SolverParameter()
    s.net = net_path
    s.test_iter.append(val_count // test_batch_for(val_count))
    s.max_iter = plan["max_iter"] if max_iter is None else max_iter
    # Never past the end: a run shorter than its test interval would end without a val number.
    s.test_interval = min(plan["test_interval"] if test_interval is None else test_interval, s.max_iter)
    s.test_initialization = False  # the first test at iteration 0 only measures chance
    s.base_lr = BASE_LR
    s.lr_policy = "step"
    s.gamma = GAMMA
    s.stepsize = plan["stepsize"]
    if family == "bn":
        s.base_lr = BN_BASE_LR * batch / BN_BATCH
        s.lr_policy = "multistep"
        s.ClearField("stepsize")
        s.stepvalue.extend(sorted({max(1, int(s.max_iter * f)) for f in BN_STEPS}))  # increasing, as Caffe wants
    s.base_lr *= lr_scale
    if solver_type != "adagrad":
        s.momentum = MOMENTUM
    s.weight_decay = WEIGHT_DECAY if weight_decay is None else weight_decay
    s.type = SOLVER_TYPES[solver_type]
    s.display = DISPLAY
    s.snapshot = plan["snapshot"]
    s.snapshot_prefix = snapshot_prefix
    s.random_seed = seed
    s.solver_mode = getattr(pb2.SolverParameter, MODES[mode])
    return s


def to_text(message):
    return text_format.MessageToString(message)
