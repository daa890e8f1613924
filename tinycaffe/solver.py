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
# ---------------------------------------------------------------- the modern recipe (issue 26)
# timm's and torchvision's ImageNet recipes, in Caffe through patches 0013-0015; `paper` is the
# schedule above, unchanged. Each value's source is in the generated header (MODERN_SOURCES).
RECIPES = ("paper", "modern")
MODERN_SOLVER = "nesterov"  # torchvision's references use Nesterov-free SGD; timm's ResNet strikes use it
MODERN_WARMUP_EPOCHS = 1  # linear warmup over the first epoch (Goyal et al. 2017, sec. 2.2)
MODERN_WARMUP_START = 0.1  # from a tenth of base_lr (torch's LinearLR start_factor)
MODERN_MIN_LR = 0.0  # the cosine ends at zero (Loshchilov & Hutter 2017 without restarts; torchvision)
MODERN_EMA_EPOCHS = 2.0  # EMA horizon 1/(1-decay) in epochs: issue 26's twin had 0.995 at 94 iterations an epoch
MODERN_LABEL_SMOOTHING = 0.1  # Szegedy et al. 2016; torchvision's and timm's 0.1
MODERN_WEIGHT_DECAY = 5e-4  # with none on BatchNorm/Scale/bias/PReLU (the generator's decay_mult 0)
MODERN_SOURCES = ("warmup %d epoch(s) from %g x base_lr then cosine to %g (Goyal et al. 2017; Loshchilov & Hutter "
                  "2017), Nesterov, weight EMA over ~%g epochs tested (timm ModelEma), label smoothing %g "
                  "(Szegedy et al. 2016), no decay on BatchNorm/Scale/bias/PReLU (timm, torchvision)"
                  % (MODERN_WARMUP_EPOCHS, MODERN_WARMUP_START, MODERN_MIN_LR, MODERN_EMA_EPOCHS,
                     MODERN_LABEL_SMOOTHING))
SOLVER_TYPES = {"sgd": "SGD", "nesterov": "Nesterov", "adagrad": "AdaGrad"}
MODES = {"gpu": "GPU", "cpu": "CPU"}


def test_batch_for(val_count, limit=MAX_TEST_BATCH):
    """The largest batch <= limit dividing val_count, so test_iter x batch covers val exactly once."""
    if val_count < 1:
        raise ValueError("val size must be >= 1, got %d" % val_count)
    return max(b for b in range(1, min(limit, val_count) + 1) if val_count % b == 0)


def make_solver(net_path, snapshot_prefix, val_count, schedule="fast", solver_type="sgd", mode="gpu",
                max_iter=None, seed=RANDOM_SEED, test_interval=None, family="paper", batch=BN_BATCH, lr_scale=1.0,
                weight_decay=None, recipe="paper", epoch_iters=None):
    """A SolverParameter for train_val at net_path. test_iter = val_count / test batch.
    family "paper": the paper's step schedule from 0.01; "bn": multistep from 0.1 x batch/128,
    /10 at 50% and 75% of max_iter (the schedule's length). lr_scale multiplies the base LR;
    weight_decay None is AlexNet's WEIGHT_DECAY. recipe "modern": the same base LR and length,
    warmed up over epoch_iters x MODERN_WARMUP_EPOCHS and annealed on a cosine, with the weights'
    moving average tested (patches 0013, 0015)."""
    if recipe not in RECIPES:
        raise ValueError("unknown recipe '%s' (valid: %s)" % (recipe, ", ".join(RECIPES)))
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
    if recipe == "modern":
        modernise(s, epoch_iters or 1)
    s.display = DISPLAY
    s.snapshot = plan["snapshot"]
    s.snapshot_prefix = snapshot_prefix
    s.random_seed = seed
    s.solver_mode = getattr(pb2.SolverParameter, MODES[mode])
    return s


def modernise(s, epoch_iters):
    """The modern recipe on a paper solver s, in place: same base_lr and max_iter; SGD becomes
    Nesterov (AdaGrad stays AdaGrad)."""
    for name in ("stepsize", "stepvalue", "gamma"):
        s.ClearField(name)
    s.lr_policy = "cosine"
    s.warmup_iter = max(1, min(int(round(MODERN_WARMUP_EPOCHS * epoch_iters)), s.max_iter // 4))
    s.warmup_start_factor = MODERN_WARMUP_START
    s.min_lr = MODERN_MIN_LR
    s.ema_decay = round(1.0 - 1.0 / max(MODERN_EMA_EPOCHS * epoch_iters, 10.0), 6)
    s.test_ema = True
    if s.type != "AdaGrad":
        s.type = SOLVER_TYPES[MODERN_SOLVER]
    s.weight_decay = MODERN_WEIGHT_DECAY


def to_text(message):
    return text_format.MessageToString(message)
