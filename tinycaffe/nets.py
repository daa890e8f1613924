"""The paper's networks as pycaffe NetSpecs: one builder per family, variants by arguments.

Families:
  alexnet_family   Caffe's AlexNet and the paper's modifications of it (LRN or not,
                   kernel sizes, ReLU or PReLU, Gaussian or Xavier fillers, BatchNorm or not)
  vgg_family       stacks of 3x3 convolutions between 2x2 max-pools (VGG-style), also
                   used, very small, for the `tiny` CPU demo net
  residual_family  ResNet-18/34 (He et al. 2016) with the CIFAR-style 3x3 stem 64x64
                   inputs need, and a narrow one for CPU demos
  inception_family GoogLeNet-style Inception modules (1x1, 3x3, two 3x3, pool projection
                   joined by Concat) with BatchNorm

Every layer is named explicitly; train_val and deploy share the names so that
weights transfer. The data layers are added by `train_val()` / `deploy()`.
"""
from dataclasses import dataclass, field

from . import augment
from .caffe_env import import_caffe

caffe = import_caffe()
from caffe import layers as L, params as P  # noqa: E402

CAFFE_TRAIN, CAFFE_TEST = 0, 1  # caffe_pb2.Phase values

# ---------------------------------------------------------------- layer helpers
# lr/decay multipliers: weights learn at base LR with weight decay, biases at 2x without (AlexNet's).
WEIGHT_BIAS_PARAMS = [dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)]
WEIGHT_ONLY_PARAMS = [dict(lr_mult=1, decay_mult=1)]
FROZEN_STATS = [dict(lr_mult=0, decay_mult=0)] * 3  # BatchNorm's mean/var/count are not learned


def weight_filler(kind, std):
    if kind in ("xavier", "msra"):  # msra: He et al.'s init, for ReLU nets without LRN or Power scaling
        return dict(type=kind)
    return dict(type="gaussian", std=std)


def conv(n, name, bottom, num_output, kernel, stride=1, pad=0, group=1, filler="gaussian", std=0.01,
         bias=0.0, bias_term=True):
    extra = dict(group=group) if group > 1 else {}  # AlexNet's two-GPU split, where used
    setattr(n, name, L.Convolution(
        bottom, name=name, num_output=num_output, kernel_size=kernel, stride=stride, pad=pad,
        weight_filler=weight_filler(filler, std), bias_term=bias_term, **extra,
        **(dict(bias_filler=dict(type="constant", value=bias), param=WEIGHT_BIAS_PARAMS)
           if bias_term else dict(param=WEIGHT_ONLY_PARAMS))))
    return getattr(n, name)


def fc(n, name, bottom, num_output, filler="gaussian", std=0.005, bias=0.0):
    setattr(n, name, L.InnerProduct(bottom, name=name, num_output=num_output, param=WEIGHT_BIAS_PARAMS,
                                    weight_filler=weight_filler(filler, std),
                                    bias_filler=dict(type="constant", value=bias)))
    return getattr(n, name)


def batch_norm(n, suffix, bottom, moving_average=None):
    """BatchNorm + Scale (Caffe's BN has no affine part), in place; use_global_stats follows the phase.
    moving_average: the running statistics' decay (None: Caffe's 0.999)."""
    extra = dict(batch_norm_param=dict(moving_average_fraction=moving_average)) if moving_average else {}
    setattr(n, "bn" + suffix, L.BatchNorm(bottom, name="bn" + suffix, in_place=True, param=FROZEN_STATS, **extra))
    setattr(n, "scale" + suffix, L.Scale(bottom, name="scale" + suffix, in_place=True, bias_term=True))
    return bottom


# PReLU's slopes learn without weight decay: He et al. (2015, arXiv:1502.01852, sec. 2.1) "do not use
# weight decay (l2 regularization) when updating a_i"; decay would pull them towards ReLU.
PRELU_PARAMS = [dict(lr_mult=1, decay_mult=0)]


def activation(n, suffix, bottom, kind):
    """ReLU or PReLU (learned per-channel slope, initialised at 0.25 as in He et al.), in place."""
    if kind == "prelu":
        setattr(n, "prelu" + suffix, L.PReLU(bottom, name="prelu" + suffix, in_place=True, param=PRELU_PARAMS))
    else:
        setattr(n, "relu" + suffix, L.ReLU(bottom, name="relu" + suffix, in_place=True))
    return bottom


def lrn(n, name, bottom):
    setattr(n, name, L.LRN(bottom, name=name, local_size=5, alpha=1e-4, beta=0.75))
    return getattr(n, name)


def max_pool(n, name, bottom, kernel, stride):
    setattr(n, name, L.Pooling(bottom, name=name, pool=P.Pooling.MAX, kernel_size=kernel, stride=stride))
    return getattr(n, name)


def dropout(n, name, bottom, ratio):
    setattr(n, name, L.Dropout(bottom, name=name, in_place=True, dropout_ratio=ratio))
    return bottom


# ---------------------------------------------------------------- families
@dataclass(frozen=True)
class ConvSpec:
    """One row of an AlexNet-style layer table."""
    num_output: int
    kernel: int
    stride: int = 1
    pad: int = 0
    group: int = 1
    bias: float = 0.0  # AlexNet's constant bias init (0 or 0.1)
    lrn: bool = False  # LRN after the activation
    pool: tuple = None  # (kernel, stride) max-pool after it, or None


def alexnet_family(n, data, convs, fcs, num_classes, act="relu", filler="gaussian", bn=False, dropout_ratio=0.5):
    """conv[i] -> (BN+Scale) -> act -> (LRN) -> (max-pool), then fc6/fc7 (+act, dropout), fc8."""
    top = data
    for i, c in enumerate(convs, 1):
        s = str(i)
        top = conv(n, "conv" + s, top, c.num_output, c.kernel, c.stride, c.pad, c.group, filler,
                   std=0.01, bias=c.bias, bias_term=not bn)
        if bn:
            top = batch_norm(n, s, top)
        top = activation(n, s, top, act)
        if c.lrn:
            top = lrn(n, "norm" + s, top)
        if c.pool:
            top = max_pool(n, "pool" + s, top, *c.pool)
    k = len(convs) + 1
    for width in fcs:
        s = str(k)
        top = fc(n, "fc" + s, top, width, filler, std=0.005, bias=0.1 if filler == "gaussian" else 0.0)
        top = activation(n, s, top, act)
        top = dropout(n, "drop" + s, top, dropout_ratio)
        k += 1
    return fc(n, "fc%d" % k, top, num_classes, filler, std=0.01, bias=0.0)


def vgg_family(n, data, stages, fcs, num_classes, act="prelu", bn=True, dropout_ratio=0.5):
    """stages of 3x3/1 pad-1 convs, each stage closed by a 2x2/2 max-pool; then fcs and the classifier."""
    top = data
    for si, widths in enumerate(stages, 1):
        for ci, width in enumerate(widths, 1):
            s = "%d_%d" % (si, ci)
            top = conv(n, "conv" + s, top, width, 3, 1, 1, filler="xavier", bias_term=not bn)
            if bn:
                top = batch_norm(n, s, top)
            top = activation(n, s, top, act)
        top = max_pool(n, "pool%d" % si, top, 2, 2)
    for fi, width in enumerate(fcs, 1):
        s = "fc%d" % fi
        top = fc(n, s, top, width, "xavier")
        top = activation(n, "_" + s, top, act)
        if dropout_ratio:
            top = dropout(n, "drop_" + s, top, dropout_ratio)
    return fc(n, "fc_out", top, num_classes, "xavier")


# The residual and Inception nets' BN statistics decay as PyTorch's (momentum 0.1): Caffe's 0.999
# averages over thousands of iterations, so the TEST-phase statistics of a short run (the CPU
# demo's few hundred iterations) still carry its first, untrained iterations.
BN_MOVING_AVERAGE = 0.9


def conv_bn(n, name, suffix, bottom, num_output, kernel, stride=1, pad=0, act="relu"):
    """conv (no bias: BN's Scale has one) -> BatchNorm + Scale -> activation (act None: none)."""
    top = conv(n, name, bottom, num_output, kernel, stride, pad, filler="msra", bias_term=False)
    top = batch_norm(n, suffix, top, BN_MOVING_AVERAGE)
    return activation(n, suffix, top, act) if act else top


def basic_block(n, block, bottom, width, stride, project, act):
    """ResNet's basic block, Caffe ResNet naming: res<block>_branch2a/2b (3x3, 3x3), the
    shortcut res<block>_branch1 (1x1 projection + BN) where the shape changes, Eltwise SUM
    res<block>, then the activation."""
    branch = conv_bn(n, "res%s_branch2a" % block, "%s_branch2a" % block, bottom, width, 3, stride, 1, act)
    branch = conv_bn(n, "res%s_branch2b" % block, "%s_branch2b" % block, branch, width, 3, 1, 1, act=None)
    shortcut = (conv_bn(n, "res%s_branch1" % block, "%s_branch1" % block, bottom, width, 1, stride, 0, act=None)
                if project else bottom)
    setattr(n, "res" + block, L.Eltwise(shortcut, branch, name="res" + block, operation=P.Eltwise.SUM))
    return activation(n, "_res" + block, getattr(n, "res" + block), act)


BLOCK_LETTERS = "abcdefghijklmnopqrstuvwxyz"  # res2a, res2b, ...: Caffe ResNet's block names
# The BN families' classifier: small Gaussian weights, so that the first loss is ln(classes)
# (msra there spread the 200 logits by ~1.0-1.4 and started resnet34 at 6.5 instead of 5.3).
CLASSIFIER_STD = 0.01


def global_pool(n, name, bottom):
    setattr(n, name, L.Pooling(bottom, name=name, pool=P.Pooling.AVE, global_pooling=True))
    return getattr(n, name)


def residual_family(n, data, widths, num_classes, depth=None, blocks=None, act="relu", stem_stride=1):
    """ResNet for 64x64 inputs: a 3x3 stem conv + BN (no 7x7/2 conv and max-pool: they would
    leave 2x2 maps), stages of basic blocks (stride 2 from the second stage), global average
    pooling, the classifier. depth 18 or 34 (He et al.'s block counts), or blocks per stage.
    No dropout: BN regularises. stem_stride 2 halves the maps once more (the CPU demo net)."""
    if blocks is None:
        if depth not in RESNET_BLOCKS:
            raise ValueError("residual depth %s: expected one of %s (or blocks per stage)"
                             % (depth, ", ".join(map(str, sorted(RESNET_BLOCKS)))))
        blocks = RESNET_BLOCKS[depth]
    top = conv_bn(n, "conv1", "_conv1", data, widths[0], 3, stem_stride, 1, act)
    in_width = widths[0]
    for stage, (width, count) in enumerate(zip(widths, blocks), 2):
        for b in range(count):
            stride = 2 if b == 0 and stage > 2 else 1
            top = basic_block(n, "%d%s" % (stage, BLOCK_LETTERS[b]), top, width, stride,
                              project=stride != 1 or width != in_width, act=act)
            in_width = width
    top = global_pool(n, "pool5", top)
    return fc(n, "fc_out", top, num_classes, std=CLASSIFIER_STD)


@dataclass(frozen=True)
class InceptionSpec:
    """One Inception module's widths: 1x1; 3x3 reduce -> 3x3; reduce -> two 3x3 (the 5x5 of
    GoogLeNet, as BN-Inception factors it); max-pool 3/1 -> 1x1 projection."""
    b1x1: int
    b3x3_reduce: int
    b3x3: int
    b33_reduce: int
    b33: int
    pool_proj: int

    @property
    def width(self):
        return self.b1x1 + self.b3x3 + self.b33 + self.pool_proj


def inception_module(n, name, bottom, spec, act):
    """Four branches on the same input, joined by Concat along the channels."""
    def unit(part, bottom, width, kernel):  # conv + BN + act, named <module>_<part> (bn_..., relu_...)
        return conv_bn(n, name + part, "_" + name + part, bottom, width, kernel, 1, kernel // 2, act)
    b1 = unit("_1x1", bottom, spec.b1x1, 1)
    b2 = unit("_3x3", unit("_3x3_reduce", bottom, spec.b3x3_reduce, 1), spec.b3x3, 3)
    b3 = unit("_double3x3_reduce", bottom, spec.b33_reduce, 1)
    b3 = unit("_double3x3b", unit("_double3x3a", b3, spec.b33, 3), spec.b33, 3)
    setattr(n, name + "_pool", L.Pooling(bottom, name=name + "_pool", pool=P.Pooling.MAX, kernel_size=3, stride=1,
                                         pad=1))
    b4 = unit("_pool_proj", getattr(n, name + "_pool"), spec.pool_proj, 1)
    setattr(n, name + "_output", L.Concat(b1, b2, b3, b4, name=name + "_output"))
    return getattr(n, name + "_output")


def inception_family(n, data, stem, stages, num_classes, act="relu"):
    """stem 3x3 conv + BN + 2x2 max-pool (60 -> 30), then stages of Inception modules with a
    2x2 max-pool between stages, global average pooling, the classifier."""
    top = conv_bn(n, "conv1", "_conv1", data, stem, 3, 1, 1, act)
    top = max_pool(n, "pool1", top, 2, 2)
    for si, modules in enumerate(stages, 3):
        if si > 3:
            top = max_pool(n, "pool%d" % (si - 1), top, 2, 2)
        for mi, spec in enumerate(modules):
            top = inception_module(n, "inception_%d%s" % (si, BLOCK_LETTERS[mi]), top, spec, act)
    top = global_pool(n, "pool_out", top)
    return fc(n, "fc_out", top, num_classes, std=CLASSIFIER_STD)


# ---------------------------------------------------------------- the variants (SPEC section 5)
# Caffe's bvlc_alexnet, unchanged but for the 60x60 input and the class count (batch 256 too).
ALEXNET_CONVS = (
    ConvSpec(96, 11, 4, 0, lrn=True, pool=(3, 2)),
    ConvSpec(256, 5, 1, 2, group=2, bias=0.1, lrn=True, pool=(3, 2)),
    ConvSpec(384, 3, 1, 1),
    ConvSpec(384, 3, 1, 1, group=2, bias=0.1),
    ConvSpec(256, 3, 1, 1, group=2, bias=0.1, pool=(3, 2)),
)
# The paper's 35% net: no LRN, 2x2 max-pools, 3x3 filters after a 5x5 stride-2 conv1
# (an 11x11/4 conv1 throws away most of a 60x60 image's resolution).
SMALL_CONVS = (
    ConvSpec(96, 5, 2, 2, pool=(2, 2)),
    ConvSpec(256, 3, 1, 1, bias=0.1, pool=(2, 2)),
    ConvSpec(384, 3, 1, 1),
    ConvSpec(384, 3, 1, 1, bias=0.1),
    ConvSpec(256, 3, 1, 1, bias=0.1, pool=(2, 2)),
)
VGG_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512))
TINY_STAGES = ((16,), (32,), (64,))
RESNET_WIDTHS = (64, 128, 256, 512)
RESNET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}  # depth -> basic blocks per stage (He et al., Table 1)
RESNET_TINY_WIDTHS = (16, 32, 64)
# GoogLeNet's modules 3a, 3b (on 30x30 maps here) and 4a, 4b (15x15), its widths (Szegedy et al.
# 2015, Table 1), each 5x5 branch as two 3x3 (BN-Inception).
INCEPTION_STAGES = (
    (InceptionSpec(64, 96, 128, 16, 32, 32), InceptionSpec(128, 128, 192, 32, 96, 64)),     # 256, 480 wide
    (InceptionSpec(192, 96, 208, 16, 48, 64), InceptionSpec(160, 112, 224, 24, 64, 64)),    # 512, 512 wide
)


@dataclass(frozen=True)
class Variant:
    name: str
    summary: str
    paper_top1: str  # the paper's val top-1, or "—"
    builder: object
    kwargs: dict = field(default_factory=dict)
    batch_size: int = 128  # default train batch
    input_scale: float = 1.0  # multiplies the mean-subtracted pixels inside the net (a Power layer)
    solver_family: str = "paper"  # solver.py's recipe: "paper" (step, 0.01) or "bn" (multistep, 0.1)
    lr_scale: float = 1.0  # multiplies the family's base LR (which already follows the batch size)
    weight_decay: float = None  # None: the solver family's (AlexNet's 5e-4)
    recipe_source: str = "AlexNet's solver and the paper's schedule"  # where its solver's numbers come from


# resnet_tiny trains at 4x the BN recipe's LR (0.1 at batch 32 instead of 0.025): in tiny's CPU
# budget on the quickstart's sample (bench_learn.py, 3 seeds) it reached 60.2% val top-1 at 1x and
# 76.5% at 4x, against tiny's 61.5% (README, "resnet_tiny").
RESNET_TINY_LR_SCALE = 4.0
# ResNets train with weight decay 1e-4: He et al. (2016, sec. 3.4 ImageNet and 4.2 CIFAR) and
# fb.resnet.torch; AlexNet's 5e-4 is five times that.
RESNET_WEIGHT_DECAY = 1e-4
RESNET_RECIPE = "He et al. 2016 (weight decay 1e-4, LR 0.1 /10 at 50%/75%) and fb.resnet.torch"


# Xavier assumes unit-variance inputs; mean-subtracted pixels have a std near 64. Unscaled,
# the Xavier nets without BatchNorm start at a loss of ~20 instead of ln(classes) and SGD
# at 0.01 diverges to NaN within 20 iterations (measured on the sample data).
XAVIER_INPUT_SCALE = 1.0 / 64


VARIANTS = {v.name: v for v in (
    Variant("alexnet", "Caffe's AlexNet, crop 60, LRN kept", "25%", alexnet_family,
            dict(convs=ALEXNET_CONVS, fcs=(4096, 4096)), batch_size=256),
    Variant("alexnet_small", "no LRN, 2x2 max-pools, mostly 3x3 filters", "35%", alexnet_family,
            dict(convs=SMALL_CONVS, fcs=(4096, 4096))),
    Variant("alexnet_prelu", "alexnet_small, every ReLU a PReLU, Xavier init", "45%", alexnet_family,
            dict(convs=SMALL_CONVS, fcs=(4096, 4096), act="prelu", filler="xavier"), input_scale=XAVIER_INPUT_SCALE),
    Variant("alexnet_prelu_bn", "alexnet_prelu + BatchNorm/Scale after every conv", "—", alexnet_family,
            dict(convs=SMALL_CONVS, fcs=(4096, 4096), act="prelu", filler="xavier", bn=True),
            input_scale=XAVIER_INPUT_SCALE),
    Variant("vgg_prelu_bn", "10 3x3 convs in 4 stages (64-512 wide), PReLU + BatchNorm", "—", vgg_family,
            dict(stages=VGG_STAGES, fcs=(2048, 2048), act="prelu", bn=True), batch_size=64,
            input_scale=XAVIER_INPUT_SCALE),
    Variant("tiny", "3 conv stages of 16/32/64, one fc of 128: a fast CPU demo net", "—", vgg_family,
            dict(stages=TINY_STAGES, fcs=(128,), act="relu", bn=False, dropout_ratio=0.0), batch_size=32,
            input_scale=XAVIER_INPUT_SCALE),
    # The residual and Inception nets have BatchNorm right after their first conv: it normalises
    # whatever scale the pixels come in, so they take no 1/64 input scaling (input_scale 1).
    Variant("resnet18", "ResNet-18, 3x3 stem, 4 stages of 2 basic blocks (64-512), BN, He init", "—",
            residual_family, dict(widths=RESNET_WIDTHS, depth=18), solver_family="bn",
            weight_decay=RESNET_WEIGHT_DECAY, recipe_source=RESNET_RECIPE),
    Variant("resnet34", "ResNet-34, 3x3 stem, stages of 3/4/6/3 basic blocks (64-512), BN, He init", "—",
            residual_family, dict(widths=RESNET_WIDTHS, depth=34), solver_family="bn",
            weight_decay=RESNET_WEIGHT_DECAY, recipe_source=RESNET_RECIPE),
    Variant("inception_small", "stem + 4 Inception modules (1x1, 3x3, 2x3x3, pool proj; Concat), BN, GAP", "—",
            inception_family, dict(stem=64, stages=INCEPTION_STAGES), solver_family="bn",
            recipe_source="the BatchNorm nets' LR 0.1 /10 at 50%/75% (He et al. 2016), AlexNet's weight decay"),
    Variant("resnet_tiny", "the residual builder at 16/32/64 wide, 1 block a stage, stride-2 stem: a CPU demo net",
            "—", residual_family, dict(widths=RESNET_TINY_WIDTHS, blocks=(1, 1, 1), stem_stride=2), batch_size=32,
            solver_family="bn", lr_scale=RESNET_TINY_LR_SCALE, weight_decay=RESNET_WEIGHT_DECAY,
            recipe_source=RESNET_RECIPE + ", at 4x the LR (tinycaffe's CPU demo measurement)"),
)}


def variant(name):
    if name not in VARIANTS:
        raise KeyError("unknown variant '%s' (valid: %s)" % (name, ", ".join(VARIANTS)))
    return VARIANTS[name]


# ---------------------------------------------------------------- whole nets
def _body(n, name, data, num_classes):
    v = variant(name)
    if v.input_scale != 1.0:
        # Inside the net, not in transform_param, so that deploy (fed by evaluate/submission
        # tools with mean-subtracted pixels only) scales exactly as train_val does.
        n.input_scale = L.Power(data, name="input_scale", power_param=dict(scale=v.input_scale))
        data = n.input_scale
    return v.builder(n, data, num_classes=num_classes, **v.kwargs)


MIXED = "data_mixed"  # the Mixup layer's data top while NetSpec builds; in place on "data" in the file


def mix(n, data, label, alpha, cutmix_alpha):
    """Mixup/CutMix of the TRAIN batch (Caffe patch 0016); TEST passes through. Returns the mixed
    data, and the loss's extra bottoms: the partners' labels and lambda."""
    n[MIXED], n.label_mix, n.mix_lambda = L.Mixup(data, label, name="mixup", ntop=3,
                                                   mixup_param=dict(alpha=alpha, cutmix_alpha=cutmix_alpha))
    return n[MIXED], [n.label_mix, n.mix_lambda]


def in_place(proto, blob, on):
    """Rename blob to `on` everywhere in proto: NetSpec cannot name a multi-top layer's top after its
    bottom, and the mixed batch replaces the data as BatchNorm's output replaces its input."""
    for layer in proto.layer:
        for names in (layer.bottom, layer.top):
            names[:] = [on if name == blob else name for name in names]


def train_val(name, train_source, val_source, mean_file, num_classes, batch_size, test_batch_size, crop,
              augmentation=None, label_smoothing=0.0, scale_decay=True, mixup=0.0, cutmix=0.0):
    """TRAIN: random crop + mirror of the train LMDB, plus `augmentation` (transform_param fields,
    augment.train_transform's); TEST: center crop of val, nothing else; loss + top-1/top-5.
    label_smoothing: the loss's (Caffe patch 0014); scale_decay False: BatchNorm's Scale
    (gamma, beta) learns without weight decay, as biases and PReLU slopes already do;
    mixup / cutmix: the Beta alphas of a Mixup layer after the data (patch 0016), 0 for none."""
    n = caffe.NetSpec()
    transform = dict(crop_size=crop, mirror=True, mean_file=mean_file)
    transform.update(augmentation or {})
    n.data, n.label = L.Data(name="data", source=train_source, backend=P.Data.LMDB, batch_size=batch_size,
                             ntop=2, include=dict(phase=CAFFE_TRAIN), transform_param=transform)
    data, mixed = mix(n, n.data, n.label, mixup, cutmix) if mixup or cutmix else (n.data, [])
    logits = _body(n, name, data, num_classes)
    n.loss = L.SoftmaxWithLoss(logits, n.label, *mixed, name="loss")
    n.accuracy_top1 = L.Accuracy(logits, n.label, name="accuracy_top1", include=dict(phase=CAFFE_TEST))
    n.accuracy_top5 = L.Accuracy(logits, n.label, name="accuracy_top5", include=dict(phase=CAFFE_TEST),
                                 accuracy_param=dict(top_k=5))
    proto = n.to_proto()
    proto.name = name
    in_place(proto, MIXED, "data")
    # NetSpec cannot hold two layers with the same tops; Caffe's own train_val files
    # have a TRAIN and a TEST "data" layer, so add the TEST one to the message.
    test_data = proto.layer.add()
    test_data.CopyFrom(proto.layer[0])
    test_data.include[0].phase = CAFFE_TEST
    test_data.data_param.source = val_source
    test_data.data_param.batch_size = test_batch_size
    test_data.transform_param.mirror = False
    for message_field in augment.AUGMENT_FIELDS:
        test_data.transform_param.ClearField(message_field)  # Caffe ignores them in TEST; the file says so too
    layers = list(proto.layer)
    del proto.layer[:]
    proto.layer.extend([layers[0], layers[-1]] + layers[1:-1])
    for layer in proto.layer:
        if layer.type == "SoftmaxWithLoss" and label_smoothing:
            layer.loss_param.label_smoothing = label_smoothing
        if layer.type == "Scale" and not scale_decay:
            del layer.param[:]
            for _ in range(2 if layer.scale_param.bias_term else 1):
                layer.param.add(lr_mult=1, decay_mult=0)
    return proto


def deploy(name, num_classes, crop):
    """Input 1x3xcropxcrop, the same layers, Softmax `prob`."""
    n = caffe.NetSpec()
    n.data = L.Input(name="data", shape=dict(dim=[1, 3, crop, crop]))
    logits = _body(n, name, n.data, num_classes)
    n.prob = L.Softmax(logits, name="prob")
    proto = n.to_proto()
    proto.name = name
    return proto
