"""Pictures of a trained net (the paper's Figure 4): first-layer filters, feature maps of one
image, and a one-page run report (Markdown + PNGs) with curves, accuracy and confusions."""
import csv
import json
import math
import os

import numpy as np
from PIL import Image

from .evaluate import input_blob
from .files import write_text

FILTER_SCALE = 8  # each filter pixel becomes 8x8 screen pixels
PAD = 2  # pixels between tiles
MAP_SCALE = 2  # feature-map pixels are doubled


def _normalise(a):
    lo, hi = float(a.min()), float(a.max())
    return np.zeros_like(a, dtype=np.float32) if hi <= lo else (a - lo) / (hi - lo)


def grid(tiles, cols):
    """tiles: list of HxWx3 or HxW float arrays in 0..1, same size -> uint8 RGB grid with PAD gaps."""
    h, w = tiles[0].shape[:2]
    rows = int(math.ceil(len(tiles) / float(cols)))
    out = np.full((rows * (h + PAD) + PAD, cols * (w + PAD) + PAD, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        rgb = t if t.ndim == 3 else np.repeat(t[:, :, None], 3, axis=2)
        out[PAD + r * (h + PAD):PAD + r * (h + PAD) + h, PAD + c * (w + PAD):PAD + c * (w + PAD) + w] = \
            (rgb * 255).round().astype(np.uint8)
    return out


def grid_size(n, h, w, cols):
    rows = int(math.ceil(n / float(cols)))
    return cols * (w + PAD) + PAD, rows * (h + PAD) + PAD  # PIL's (width, height)


def first_conv(net):
    for name, layer in zip(net._layer_names, net.layers):
        if layer.type == "Convolution":
            return name
    raise ValueError("the net has no Convolution layer")


def save_png(array, path):
    tmp = path + ".tmp.png"
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)


def filter_grid(net, path, layer=None):
    """First conv layer's filters, each shown in colour (BGR weights -> RGB), 8 px per weight."""
    layer = layer or first_conv(net)
    w = net.params[layer][0].data  # out x in x kh x kw
    tiles = []
    for f in w:
        img = f[::-1].transpose(1, 2, 0) if f.shape[0] == 3 else f.mean(0)
        img = _normalise(img)
        tiles.append(np.kron(img, np.ones((FILTER_SCALE, FILTER_SCALE) + ((1,) if img.ndim == 3 else ()))))
    cols = int(math.ceil(math.sqrt(len(tiles))))
    save_png(grid(tiles, cols), path)
    return layer, len(tiles), cols


def feature_maps(net, image_chw_minus_mean, out_dir, layers=2, max_maps=64):
    """Forward one image (already minus the mean, crop-sized) and save the maps of the first
    `layers` conv layers as grids; returns the paths."""
    blob = input_blob(net)
    net.blobs[blob].reshape(1, *image_chw_minus_mean.shape)
    net.reshape()
    net.blobs[blob].data[0] = image_chw_minus_mean
    net.forward()
    convs = [n for n, layer in zip(net._layer_names, net.layers) if layer.type == "Convolution"][:layers]
    paths = []
    for name in convs:
        top = net.top_names[name][0]
        maps = net.blobs[top].data[0][:max_maps]
        tiles = [np.kron(_normalise(m), np.ones((MAP_SCALE, MAP_SCALE))) for m in maps]
        path = os.path.join(out_dir, "features_%s.png" % name)
        save_png(grid(tiles, int(math.ceil(math.sqrt(len(tiles))))), path)
        paths.append(path)
    return paths


def write_report(run_dir, out_path=None):
    """report.md beside the run's files: curves, filters, feature maps, per-class accuracy, confusions.
    Only files that exist are referenced."""
    out_path = out_path or os.path.join(run_dir, "report.md")
    lines = ["# Run report: %s" % run_dir, ""]
    record_path = os.path.join(run_dir, "run.json")
    if os.path.isfile(record_path):
        with open(record_path) as f:
            r = json.load(f)
        final = r.get("final", {})
        lines += ["variant `%s`, status %s, %s iterations, best val top-1 %s, top-5 %s" % (
            r.get("variant"), r.get("status"), final.get("iterations"),
            final.get("best_accuracy_top1"), final.get("best_accuracy_top5")), ""]
    for title, name in (("Learning curves", "curves.png"), ("First-layer filters", "filters.png")):
        if os.path.isfile(os.path.join(run_dir, name)):
            lines += ["## " + title, "", "![%s](%s)" % (title, name), ""]
    maps = sorted(f for f in os.listdir(run_dir) if f.startswith("features_") and f.endswith(".png"))
    if maps:
        lines += ["## Feature maps of one val image", ""] + ["![%s](%s)" % (m, m) for m in maps] + [""]
    evals = sorted(f for f in os.listdir(run_dir) if f.startswith("eval_") and f.endswith(".json"))
    for name in evals:
        with open(os.path.join(run_dir, name)) as f:
            e = json.load(f)
        lines += ["## Evaluation (%s, %d images): top-1 %.4f, top-5 %.4f" % (e["tta"], e["images"], e["top1"],
                                                                          e["top5"]), "",
                  "| true | predicted | count |", "|---|---|---:|"]
        lines += ["| %s | %s | %d |" % (c["true"], c["predicted"], c["count"]) for c in e["confusions"]] + [""]
        per_class = os.path.join(run_dir, "per_class_%s.csv" % e["tta"])
        if os.path.isfile(per_class):
            with open(per_class) as f:
                rows = list(csv.DictReader(f))
            rows.sort(key=lambda row: float(row["top1"] or 0))
            lines += ["Per-class accuracy (`%s`), worst first:" % os.path.basename(per_class), "",
                      "| class | wnid | words | images | top-1 |", "|---:|---|---|---:|---:|"]
            lines += ["| %s | %s | %s | %s | %s |" % (row["class"], row["wnid"], row["words"], row["images"],
                                                      row["top1"]) for row in rows] + [""]
    write_text(out_path, "\n".join(lines) + "\n")
    return out_path
