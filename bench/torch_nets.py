"""The same nets in PyTorch, built from our Caffe prototxt, for the side-by-side GPU bench.

`CaffeTwin(net_param, input_shape)` reads a NetParameter (one phase's layers) and
builds the PyTorch module that computes the same function, layer by layer, named as in
Caffe: Convolution (groups), Pooling (Caffe rounds output sizes up: ceil_mode), LRN,
ReLU, PReLU, BatchNorm (+ the Scale after it, as one affine BatchNorm2d, the way a
PyTorch user writes it), InnerProduct, Dropout, Power, Eltwise (SUM, PROD, MAX),
Concat, Softmax and SoftmaxWithLoss.
`load_caffe_weights` copies a pycaffe Net's parameters in, so tests can check that
both compute the same outputs before any timing is trusted.

PyTorch is not a dependency of tinycaffe: only bench/bench_gpu.py imports this file.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

INPUT_TYPES = ("Data", "DummyData", "Input", "ImageData", "HDF5Data")
SKIPPED_TYPES = ("Accuracy", "Silence")


def _pair(repeated, single, default):
    """Caffe's kernel_size/stride/pad: a repeated field, or kernel_h/kernel_w style singles."""
    if len(repeated):
        return int(repeated[0])
    return int(single) if single else default


def _in_phase(layer, phase):
    """Caffe's include/exclude rules, for the phase only (TRAIN or TEST)."""
    def matches(rule):
        return rule.HasField("phase") and rule.phase == (0 if phase == "TRAIN" else 1)
    if layer.include:
        return any(matches(rule) for rule in layer.include)
    return not any(matches(rule) for rule in layer.exclude)


class Power(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.power, self.scale, self.shift = p.power, p.scale, p.shift

    def forward(self, x):
        y = x * self.scale + self.shift
        return y if self.power == 1 else y.pow(self.power)


class CaffeTwin(nn.Module):
    """A PyTorch module equal to a Caffe net (a DAG of named blobs, run in layer order)."""

    def __init__(self, net, input_shape, phase="TRAIN"):
        super().__init__()
        self.steps = []              # (layer name, kind, bottoms, tops)
        self.eltwise = {}            # Eltwise name -> (operation, coefficients)
        self.layers = nn.ModuleDict()
        self.inputs = []
        self.fused_scales = set()    # Scale layers folded into the BatchNorm before them
        self.scale_of = {}           # BatchNorm name -> its folded Scale's name
        shapes = {}
        self._shape_of = shapes.__getitem__  # Concat reads the shapes of all its inputs
        layers = [layer for layer in net.layer if _in_phase(layer, phase)]
        for i, layer in enumerate(layers):
            kind = layer.type
            if kind in INPUT_TYPES:
                shapes[layer.top[0]] = tuple(input_shape)
                self.inputs.extend(layer.top)  # data, and label when there is one
                if len(layer.top) > 1:
                    shapes[layer.top[1]] = (input_shape[0],)
                continue
            if kind in SKIPPED_TYPES or layer.name in self.fused_scales:
                continue
            if kind == "Eltwise":
                p = layer.eltwise_param
                self.eltwise[layer.name] = (p.operation, list(p.coeff) or [1.0] * len(layer.bottom))
            shape = shapes[layer.bottom[0]]
            module, out_shape = self._module(layer, shape, layers[i + 1:])
            if module is not None:
                self.layers[layer.name] = module
            self.steps.append((layer.name, kind, list(layer.bottom), list(layer.top)))
            for top in layer.top:
                shapes[top] = out_shape
        self.shapes = shapes

    def _module(self, layer, shape, rest):
        kind = layer.type
        if kind == "Convolution":
            p = layer.convolution_param
            k = _pair(p.kernel_size, p.kernel_h, 1)
            s = _pair(p.stride, p.stride_h, 1)
            pad = _pair(p.pad, p.pad_h, 0)
            out = (shape[0], p.num_output, (shape[2] + 2 * pad - k) // s + 1, (shape[3] + 2 * pad - k) // s + 1)
            return nn.Conv2d(shape[1], p.num_output, k, s, pad, groups=p.group or 1, bias=p.bias_term), out
        if kind == "Pooling":
            p = layer.pooling_param
            is_max = p.pool == p.MAX
            if p.global_pooling:
                return (nn.AdaptiveMaxPool2d(1) if is_max else nn.AdaptiveAvgPool2d(1)), (shape[0], shape[1], 1, 1)
            k, s, pad = p.kernel_size or p.kernel_h, p.stride or p.stride_h or 1, p.pad or p.pad_h
            out = (shape[0], shape[1]) + tuple(self._pooled(x, k, s, pad) for x in shape[2:])
            # Caffe rounds pooled sizes up: ceil_mode, with the same last-window rule.
            if is_max:
                return nn.MaxPool2d(k, s, pad, ceil_mode=True), out
            return nn.AvgPool2d(k, s, pad, ceil_mode=True, count_include_pad=True), out
        if kind == "LRN":
            p = layer.lrn_param
            return nn.LocalResponseNorm(p.local_size, p.alpha, p.beta, p.k), shape
        if kind == "ReLU":
            return None, shape
        if kind == "PReLU":
            channels = 1 if layer.prelu_param.channel_shared else shape[1]
            return nn.PReLU(channels, init=0.25), shape
        if kind == "BatchNorm":
            p = layer.batch_norm_param
            # The Scale right after (same blob): its gamma/beta are the affine part.
            nxt = next((r for r in rest if r.type not in SKIPPED_TYPES), None)
            affine = nxt is not None and nxt.type == "Scale" and list(nxt.bottom) == list(layer.top)
            if affine:
                self.fused_scales.add(nxt.name)
                self.scale_of[layer.name] = nxt.name
            return nn.BatchNorm2d(shape[1], eps=p.eps, momentum=1 - p.moving_average_fraction, affine=affine), shape
        if kind == "InnerProduct":
            p = layer.inner_product_param
            return nn.Linear(math.prod(shape[1:]), p.num_output, bias=p.bias_term), (shape[0], p.num_output)
        if kind == "Dropout":
            return nn.Dropout(layer.dropout_param.dropout_ratio), shape
        if kind == "Power":
            return Power(layer.power_param), shape
        if kind in ("Softmax", "SoftmaxWithLoss"):
            return None, shape if kind == "Softmax" else ()
        if kind == "Eltwise":
            return None, shape
        if kind == "Concat":
            axis = layer.concat_param.axis if layer.concat_param.HasField("axis") else 1
            if axis != 1:
                raise ValueError("layer '%s': Concat along axis %d has no twin here (only channels)"
                                 % (layer.name, axis))
            channels = sum(self._shape_of(b)[1] for b in layer.bottom)
            return None, (shape[0], channels) + tuple(shape[2:])
        raise ValueError("layer '%s': type %s has no PyTorch twin here" % (layer.name, kind))

    def _eltwise(self, name, xs):
        """Caffe's Eltwise: PROD = 0, SUM = 1 (with coefficients), MAX = 2."""
        operation, coeff = self.eltwise[name]
        if operation == 0:
            return math.prod(xs[1:], start=xs[0])
        if operation == 2:
            return torch.stack(xs).amax(dim=0)
        out = coeff[0] * xs[0]
        for c, x in zip(coeff[1:], xs[1:]):
            out = out + c * x
        return out

    @staticmethod
    def _pooled(size, k, s, pad):
        """Caffe's pooled size: rounded up, and the last window must start inside the image."""
        out = int(math.ceil((size + 2 * pad - k) / s)) + 1
        if pad and (out - 1) * s >= size + pad:
            out -= 1
        return out

    def forward(self, *inputs):
        blobs = dict(zip(self.inputs, inputs))
        for name, kind, bottoms, tops in self.steps:
            x = blobs[bottoms[0]]
            if kind == "ReLU":
                y = F.relu(x)
            elif kind == "InnerProduct":
                y = self.layers[name](x.flatten(1))
            elif kind == "Softmax":
                y = F.softmax(x, dim=1)
            elif kind == "SoftmaxWithLoss":
                y = F.cross_entropy(x, blobs[bottoms[1]].long())
            elif kind == "Eltwise":
                y = self._eltwise(name, [blobs[b] for b in bottoms])
            elif kind == "Concat":
                y = torch.cat([blobs[b] for b in bottoms], dim=1)
            else:
                y = self.layers[name](x)
            blobs[tops[0]] = y
        return blobs


def build(net, input_shape, phase="TRAIN"):
    return CaffeTwin(net, input_shape, phase)


def load_caffe_weights(model, caffe_net):
    """Copy a pycaffe Net's parameters (and BatchNorm statistics) into the twin."""
    params = caffe_net.params
    with torch.no_grad():
        for name, module in model.layers.items():
            if name not in params:
                continue
            blobs = [torch.from_numpy(b.data.copy()) for b in params[name]]
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.copy_(blobs[0].reshape(module.weight.shape))
                if module.bias is not None:
                    module.bias.copy_(blobs[1])
            elif isinstance(module, nn.PReLU):
                module.weight.copy_(blobs[0].reshape(module.weight.shape))
            elif isinstance(module, nn.BatchNorm2d):
                factor = float(blobs[2].reshape(-1)[0])
                factor = 0.0 if factor == 0 else 1.0 / factor
                module.running_mean.copy_(blobs[0] * factor)
                module.running_var.copy_(blobs[1] * factor)
                scale = model.scale_of.get(name)
                if scale:
                    module.weight.copy_(torch.from_numpy(params[scale][0].data.copy()))
                    module.bias.copy_(torch.from_numpy(params[scale][1].data.copy()))
    return model


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())
