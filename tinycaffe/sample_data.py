"""A small synthetic dataset in the exact on-disk layout of tiny-imagenet-200.

The real archive cannot be downloaded on the machines that build and test
tinycaffe, so the quickstart, the tests and the benchmarks use this instead.
Each class is a shape drawn in a colour with a texture; position, scale,
rotation, background and clutter are random, so a small net has to learn
something (the cues are not in fixed pixels) yet gets well above chance in a
few CPU minutes. Everything is decided by ``seed``: two runs with the same
arguments write byte-identical files.
"""
import colorsys
import math
import os
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from . import resources
from .files import write_text

IMAGE_SIZE = 64  # Tiny ImageNet images are 64x64
MAX_CLASSES = 200  # the release has 200 classes; we have that many real wnids
GRAYSCALE_FRACTION = 0.04  # about 1 in 25 real Tiny ImageNet JPEGs is single-channel
JPEG_QUALITY = 90  # close to the release's files; no chroma surprises at 64 px

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "bar", "diamond")
COLOURS = {  # name -> RGB; far apart in hue so that colour is a usable cue
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
    "yellow": (230, 210, 40), "magenta": (200, 50, 200),
}
TEXTURES = ("solid", "striped", "checkered", "dotted", "shaded")
# 8 shapes x 5 colours x 5 textures = 200 distinct classes.
# colours="random": classes are shape x texture only (40), each object in a random colour, so
# colour carries no class information and colour augmentation should help rather than hurt.
COLOUR_MODES = ("class", "random")
RANDOM_COLOUR = "any-colour"


@dataclass(frozen=True)
class SampleClass:
    index: int
    wnid: str
    shape: str
    colour: str
    texture: str

    @property
    def words(self):
        """What words.txt says for this class: a readable description."""
        return "%s %s %s" % (self.texture, self.colour, self.shape)


def class_table(num_classes, colours="class"):
    """Class i: shapes vary fastest, then colours (colours="class"), then textures."""
    if colours not in COLOUR_MODES:
        raise ValueError("--colours must be one of %s, got '%s'" % (", ".join(COLOUR_MODES), colours))
    limit = MAX_CLASSES if colours == "class" else len(SHAPES) * len(TEXTURES)
    if not 1 <= num_classes <= limit:
        raise ValueError("--classes must be in 1..%d%s, got %d"
                         % (limit, "" if colours == "class" else " with --colours random (shapes x textures)",
                            num_classes))
    wnids = resources.reference_wnids()[:num_classes]
    colours = list(COLOURS) if colours == "class" else [RANDOM_COLOUR]
    return [SampleClass(i, wnid, SHAPES[i % len(SHAPES)],
                        colours[(i // len(SHAPES)) % len(colours)],
                        TEXTURES[(i // (len(SHAPES) * len(colours))) % len(TEXTURES)])
            for i, wnid in enumerate(wnids)]


# ---------------------------------------------------------------- drawing
def _shape_polygon(shape, cx, cy, r, angle):
    """Outline points of `shape` centred at (cx, cy) with radius r, rotated."""
    def rot(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]
    if shape == "square":
        return rot([(-r, -r), (r, -r), (r, r), (-r, r)])
    if shape == "diamond":
        return rot([(0, -r), (0.6 * r, 0), (0, r), (-0.6 * r, 0)])
    if shape == "triangle":
        return rot([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    if shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rr * math.cos(a), rr * math.sin(a)))
        return rot(pts)
    if shape == "cross":
        t = 0.33 * r
        return rot([(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r),
                    (-t, t), (-r, t), (-r, -t), (-t, -t)])
    if shape == "bar":
        return rot([(-r, -0.3 * r), (r, -0.3 * r), (r, 0.3 * r), (-r, 0.3 * r)])
    raise ValueError(shape)


def _object_mask(shape, cx, cy, r, angle):
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        h = 0.55 * r
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=0)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, angle), fill=255)
    return mask


def _texture(texture, colour, rng):
    """A 64x64 RGB fill: the class colour modulated by the class texture."""
    base = np.array(colour, np.float32) * rng.uniform(0.8, 1.1)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    period = rng.uniform(5, 9)
    if texture == "striped":
        theta = rng.uniform(0, math.pi)
        m = (np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period) > 0)
        shade = np.where(m, 1.0, 0.35)
    elif texture == "checkered":
        shade = np.where(((xx // (period / 2)) + (yy // (period / 2))) % 2 == 0, 1.0, 0.35)
    elif texture == "dotted":
        d = np.hypot((xx % period) - period / 2, (yy % period) - period / 2)
        shade = np.where(d < period / 4, 0.3, 1.0)
    elif texture == "shaded":
        theta = rng.uniform(0, 2 * math.pi)
        g = (xx * math.cos(theta) + yy * math.sin(theta)) / IMAGE_SIZE
        shade = 0.35 + 0.65 * (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
    else:
        shade = np.ones_like(xx)
    return np.clip(base[None, None, :] * shade[..., None], 0, 255)


def _background(rng):
    """A dim, low-saturation gradient with noise: never one of the class colours."""
    c0 = np.array([rng.uniform(60, 170)] * 3) + np.array([rng.uniform(-25, 25) for _ in range(3)])
    c1 = np.array([rng.uniform(60, 170)] * 3) + np.array([rng.uniform(-25, 25) for _ in range(3)])
    t = np.linspace(0, 1, IMAGE_SIZE, dtype=np.float32)
    grad = t[:, None, None] * c1[None, None, :] + (1 - t[:, None, None]) * c0[None, None, :]
    if rng.random() < 0.5:
        grad = grad.transpose(1, 0, 2)
    return np.broadcast_to(grad, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


def _clutter(img, rng):
    """Thin lines and small blobs in random colours (class colours included)."""
    draw = ImageDraw.Draw(img)
    palette = list(COLOURS.values()) + [(250, 250, 250), (20, 20, 20)]
    for _ in range(rng.randint(2, 6)):
        colour = palette[rng.randrange(len(palette))]
        x0, y0 = rng.uniform(0, 63), rng.uniform(0, 63)
        if rng.random() < 0.5:
            draw.line([x0, y0, x0 + rng.uniform(-20, 20), y0 + rng.uniform(-20, 20)], fill=colour, width=1)
        else:
            s = rng.uniform(1.5, 3.5)
            draw.ellipse([x0 - s, y0 - s, x0 + s, y0 + s], fill=colour)


def _random_colour(rng):
    """Any hue, clearly saturated and lit, so shape and texture stay visible."""
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.6, 0.95))
    return (r * 255, g * 255, b * 255)


def render(cls, rng):
    """One image of class `cls`: returns (PIL RGB image, box (x0, y0, x1, y1))."""
    r = rng.uniform(9, 20)
    cx, cy = rng.uniform(r * 0.6, IMAGE_SIZE - r * 0.6), rng.uniform(r * 0.6, IMAGE_SIZE - r * 0.6)
    angle = rng.uniform(-0.5, 0.5)
    pixels = _background(rng).copy()
    mask = np.asarray(_object_mask(cls.shape, cx, cy, r, angle), np.float32)[..., None] / 255.0
    colour = COLOURS[cls.colour] if cls.colour != RANDOM_COLOUR else _random_colour(rng)
    pixels = pixels * (1 - mask) + _texture(cls.texture, colour, rng) * mask
    np_rng = np.random.default_rng(rng.getrandbits(32))
    pixels += np_rng.normal(0, rng.uniform(3, 12), pixels.shape)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    _clutter(img, rng)
    ys, xs = np.nonzero(mask[..., 0] > 0.5)
    if len(xs) == 0:  # cannot happen with r >= 9, but a box must always be valid
        xs, ys = np.array([int(cx)]), np.array([int(cy)])
    box = tuple(int(min(max(v, 0), IMAGE_SIZE - 1)) for v in (xs.min(), ys.min(), xs.max(), ys.max()))
    return img, box


def _save_counting(img, path, rng, force_gray=False):
    """Save as JPEG like the release: mostly RGB, a few single-channel. Returns 1 if gray."""
    gray = rng.random() < GRAYSCALE_FRACTION or force_gray
    (img.convert("L") if gray else img).save(path, "JPEG", quality=JPEG_QUALITY)
    return int(gray)


# ---------------------------------------------------------------- layout
def _image_rng(seed, split, i):
    # A string seed is hashed (sha512) by random.Random: stable across runs and
    # platforms, and each image is independent of how many came before it.
    return random.Random("tinycaffe-sample/%d/%s/%d" % (seed, split, i))


def _write_lines(path, lines):
    write_text(path, "".join(line + "\n" for line in lines))


def _balanced_labels(num_classes, per_class, rng):
    labels = [c for c in range(num_classes) for _ in range(per_class)]
    rng.shuffle(labels)
    return labels


def _words_lines(classes, seed):
    """words.txt lists every synset we know, far more than the classes (as the release does)."""
    ours = {c.wnid: c.words for c in classes}
    lines = []
    for wnid in resources.reference_wnids():
        lines.append("%s\t%s" % (wnid, ours.get(wnid, "unused synset %s" % wnid)))
    # Synsets that are never classes, like the ~82,000 extra lines of the real file.
    rng = random.Random("tinycaffe-sample-words/%d" % seed)
    taken = set(resources.reference_wnids())
    wanted = len(lines) + 300
    while len(lines) < wanted:
        wnid = "n%08d" % rng.randrange(10 ** 8)
        if wnid not in taken:
            taken.add(wnid)
            lines.append("%s\tdistractor synset %s" % (wnid, wnid))
    return sorted(lines)


def generate(out_dir, classes=10, train=100, val=20, test=20, seed=0, progress=None, colours="class"):
    """Write the dataset under out_dir (created; must not already hold one).

    Returns a summary dict with counts. `progress`, if given, is called with the
    number of images written since the last call.
    """
    for name, value in (("--train", train), ("--val", val), ("--test", test)):
        if value < 0:
            raise ValueError("%s must be >= 0, got %d" % (name, value))
    table = class_table(classes, colours)
    if os.path.exists(os.path.join(out_dir, "wnids.txt")):
        raise FileExistsError("%s already holds a dataset (wnids.txt exists); choose an empty directory"
                              % out_dir)
    tick = progress or (lambda n: None)
    os.makedirs(out_dir, exist_ok=True)
    order = list(table)
    # The release's wnids.txt is not sorted; make sure ours is not either.
    if len(order) > 1 and [c.wnid for c in order] == sorted(c.wnid for c in order):
        order = order[1:] + order[:1]
    _write_lines(os.path.join(out_dir, "words.txt"), _words_lines(table, seed))

    grayscale = 0
    for cls in table:
        img_dir = os.path.join(out_dir, "train", cls.wnid, "images")
        os.makedirs(img_dir, exist_ok=True)
        boxes = []
        for i in range(train):
            rng = _image_rng(seed, "train/" + cls.wnid, i)
            img, box = render(cls, rng)
            name = "%s_%d.JPEG" % (cls.wnid, i)
            # Image 1 of the first class is always gray, so even a tiny dataset has one.
            grayscale += _save_counting(img, os.path.join(img_dir, name), rng,
                                        force_gray=(cls.index == 0 and i == 1))
            boxes.append("%s\t%d\t%d\t%d\t%d" % ((name,) + box))
            tick(1)
        _write_lines(os.path.join(out_dir, "train", cls.wnid, "%s_boxes.txt" % cls.wnid), boxes)

    split_rng = random.Random("tinycaffe-sample-splits/%d" % seed)
    for split, per_class in (("val", val), ("test", test)):
        img_dir = os.path.join(out_dir, split, "images")
        os.makedirs(img_dir, exist_ok=True)
        annotations = []
        for i, label in enumerate(_balanced_labels(classes, per_class, split_rng)):
            rng = _image_rng(seed, split, i)
            img, box = render(table[label], rng)
            name = "%s_%d.JPEG" % (split, i)
            grayscale += _save_counting(img, os.path.join(img_dir, name), rng, force_gray=(i == 1))
            annotations.append("%s\t%s\t%d\t%d\t%d\t%d" % ((name, table[label].wnid) + box))
            tick(1)
        if split == "val":  # test labels are secret in the release: no file for them
            _write_lines(os.path.join(out_dir, "val", "val_annotations.txt"), annotations)

    # wnids.txt last: its presence marks a complete dataset.
    _write_lines(os.path.join(out_dir, "wnids.txt"), [c.wnid for c in order])
    return {"classes": classes, "train": classes * train, "val": classes * val,
            "test": classes * test, "grayscale": grayscale, "seed": seed, "colours": colours}
