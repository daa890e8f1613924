"""Training-data augmentation presets for the TRAIN Data layer's transform_param.

Caffe patch 0010 (scripts/patches/) adds three TransformationParameter fields, applied
to raw Datums in the TRAIN phase only: SSD's `distort_param` (brightness, contrast,
saturation, hue, channel order), `lighting_param` (AlexNet's PCA lighting) and
`random_resized_crop_param` (torchvision's RandomResizedCrop); patch 0018 adds
`random_erasing_param` (random erasing, last, on the output). This module names presets of
them for gen_prototxt's `--augment` (and `--random-erasing`), and checks hand-edited values.
"""
import json
import math
import os

# ---------------------------------------------------------------- presets (documented values)
# SSD's distortion as ssd_pascal.py trains with it (weiliu89/caffe, ssd branch).
SSD_DISTORT = dict(
    brightness_prob=0.5, brightness_delta=32.0,  # add U(-32, 32) to every value
    contrast_prob=0.5, contrast_lower=0.5, contrast_upper=1.5,  # multiply by U(0.5, 1.5)
    saturation_prob=0.5, saturation_lower=0.5, saturation_upper=1.5,  # scale HSV's S by U(0.5, 1.5)
    hue_prob=0.5, hue_delta=18.0,  # add U(-18, 18) to H on OpenCV's 0-180 scale (+-36 degrees)
    random_order_prob=0.0,  # SSD trains with the channel order kept
)
LIGHTING_ALPHASTD = 0.1  # AlexNet section 4.1 and fb.resnet.torch
RESIZED_CROP = dict(min_area=0.08, max_area=1.0, min_aspect=3.0 / 4.0, max_aspect=4.0 / 3.0)  # torchvision's
# Random erasing (Zhong et al. 2017; patch 0018), timm's RandomErasing ranges (torchvision's to
# two decimals): the rectangle's area fraction and aspect (height / width), and the fill (0: the mean).
RANDOM_ERASING = dict(min_area=0.02, max_area=1.0 / 3.0, min_aspect=0.3, max_aspect=1.0 / 0.3, value=0.0)

# What each --augment preset turns on; the random crop to --crop is always there (Caffe's own).
PRESETS = {
    "none": dict(mirror=False),  # random crop only
    "flip": dict(mirror=True),  # + mirror: Caffe's and the paper's (the default)
    "colour": dict(mirror=True, distort=True),  # + SSD's brightness/contrast/saturation/hue distortion
    "scale": dict(mirror=True, resized_crop=True),  # + random-resized crop instead of the plain crop
    "full": dict(mirror=True, distort=True, lighting=True, resized_crop=True),  # all, + PCA lighting (SPEC 4)
}
DEFAULT_PRESET = "flip"

# fb.resnet.torch's ImageNet basis (RGB, pixel values in [0, 1]) in this toolkit's convention
# (pixel units, rows B, G, R): the fallback when the LMDBs' manifest has no pca_bgr of its own.
_IMAGENET_EIGVAL_01 = (0.2175, 0.0188, 0.0045)
_IMAGENET_EIGVEC_RGB = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))
IMAGENET_PCA_BGR = {
    "eigval": [round(v * 255.0, 4) for v in _IMAGENET_EIGVAL_01],
    "eigvec": [list(row) for row in reversed(_IMAGENET_EIGVEC_RGB)],
    "source": "ImageNet (fb.resnet.torch), scaled to pixel units",
}


def preset(name):
    if name not in PRESETS:
        raise ValueError("unknown --augment preset '%s' (valid: %s)" % (name, ", ".join(PRESETS)))
    return PRESETS[name]


def finite_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_basis(lmdb_dir):
    """The train split's colour PCA from manifest.json beside the LMDBs, or None when the
    manifest is missing or has none; ValueError naming the file if it is malformed."""
    path = os.path.join(lmdb_dir, "manifest.json")
    try:
        with open(path) as f:
            basis = json.load(f).get("pca_bgr")
    except (OSError, ValueError, AttributeError):
        return None
    if basis is None:
        return None
    eigval = basis.get("eigval") if isinstance(basis, dict) else None
    eigvec = basis.get("eigvec") if isinstance(basis, dict) else None
    if not (isinstance(eigval, list) and len(eigval) == 3 and all(finite_number(v) and v >= 0 for v in eigval)):
        raise ValueError("%s: pca_bgr.eigval must be 3 finite numbers >= 0, got %r" % (path, eigval))
    if not (isinstance(eigvec, list) and len(eigvec) == 3 and
            all(isinstance(row, list) and len(row) == 3 and all(finite_number(v) for v in row) for row in eigvec)):
        raise ValueError("%s: pca_bgr.eigvec must be a 3x3 list of finite numbers (rows B, G, R), got %r"
                         % (path, eigvec))
    return dict(basis, source=path)


def train_transform(name, basis=None, random_erasing=0.0):
    """The TRAIN transform_param fields of preset `name` (a dict NetSpec and protobuf accept).

    basis: a pca_bgr dict (eigval, eigvec) for PCA lighting; ImageNet's when None.
    random_erasing: the probability of erasing a rectangle (RANDOM_ERASING's ranges); 0: none.
    """
    chosen = preset(name)
    fields = {"mirror": chosen["mirror"]}
    if chosen.get("distort"):
        fields["distort_param"] = dict(SSD_DISTORT)
    if chosen.get("lighting"):
        basis = basis or IMAGENET_PCA_BGR
        fields["lighting_param"] = dict(alphastd=LIGHTING_ALPHASTD, eigval=list(basis["eigval"]),
                                        eigvec=[v for row in basis["eigvec"] for v in row])
    if chosen.get("resized_crop"):
        fields["random_resized_crop_param"] = dict(RESIZED_CROP)
    if random_erasing:
        fields["random_erasing_param"] = dict(RANDOM_ERASING, prob=random_erasing)
    return fields


AUGMENT_FIELDS = ("distort_param", "lighting_param", "random_resized_crop_param", "random_erasing_param")


def _between(value, low, high):
    """low <= value <= high, and False for NaN (which every comparison lets through)."""
    return math.isfinite(value) and low <= value <= high


def resized_crop_fallback(height, width, r):
    """(crop_h, crop_w) of the random-resized crop's centred fallback (patch 0010's
    SampleResizedCrop, torchvision's): the largest rectangle whose aspect is in range."""
    h, w = height, width
    if width / height < r.min_aspect:
        h = _lround(w / r.min_aspect)
    elif width / height > r.max_aspect:
        w = _lround(h * r.max_aspect)
    return h, w


def _lround(x):
    """C's lround for x >= 0: halves away from zero (Python's round() takes them to even: 0.5 -> 0)."""
    return int(math.floor(x + 0.5))


def check_transform(tp, where, channels=3, image_side=None):
    """Problems (one line each) with a transform_param's augmentation fields; [] when fine.

    Caffe would stop on most of these with a CHECK failure and a stack dump (patch 0012 makes
    the rest CHECKs too); this says which field and what was expected, before a run starts.
    image_side: the images' side when known (default 64, SPEC's), for the random-resized crop.
    """
    problems = []
    if tp.HasField("distort_param"):
        d = tp.distort_param
        for field in ("brightness_prob", "contrast_prob", "saturation_prob", "hue_prob", "random_order_prob"):
            if not _between(getattr(d, field), 0, 1):
                problems.append("%s: distort_param.%s is %g, expected a probability in [0, 1]"
                                % (where, field, getattr(d, field)))
        if not _between(d.brightness_delta, 0, 255):
            problems.append("%s: distort_param.brightness_delta is %g, expected 0..255" % (where, d.brightness_delta))
        if not _between(d.hue_delta, 0, 180):
            problems.append("%s: distort_param.hue_delta is %g, expected 0..180 (OpenCV hue units)"
                            % (where, d.hue_delta))
        for kind in ("contrast", "saturation"):
            lower, upper = getattr(d, kind + "_lower"), getattr(d, kind + "_upper")
            if getattr(d, kind + "_prob") > 0 and not (_between(lower, 0, math.inf) and _between(upper, lower, math.inf)):
                problems.append("%s: distort_param.%s_lower/%s_upper are %g/%g, expected 0 <= lower <= upper"
                                % (where, kind, kind, lower, upper))
            elif not (math.isfinite(lower) and math.isfinite(upper)):  # unused, but Caffe (patch 0012) refuses it
                problems.append("%s: distort_param.%s_lower/%s_upper are %g/%g, expected finite numbers"
                                % (where, kind, kind, lower, upper))
    if tp.HasField("lighting_param"):
        lp = tp.lighting_param
        if not _between(lp.alphastd, 0, math.inf):
            problems.append("%s: lighting_param.alphastd is %g, expected >= 0" % (where, lp.alphastd))
        if lp.alphastd > 0 and (len(lp.eigval) != channels or len(lp.eigvec) != channels * channels):
            problems.append("%s: lighting_param has %d eigval and %d eigvec values, expected %d and %d "
                            "(one per channel; the %dx%d axes matrix row by row)"
                            % (where, len(lp.eigval), len(lp.eigvec), channels, channels * channels,
                               channels, channels))
        if not all(_between(v, 0, math.inf) for v in lp.eigval) or not all(math.isfinite(v) for v in lp.eigvec):
            problems.append("%s: lighting_param has a negative or non-finite value, expected finite eigvec and "
                            "eigval >= 0 (standard deviations)" % where)
    if tp.HasField("random_resized_crop_param"):
        r = tp.random_resized_crop_param
        problems.extend(_rectangle_problems(r, "random_resized_crop_param", where))
        side = image_side or 64
        if r.min_aspect > 0 and r.max_aspect >= r.min_aspect and min(resized_crop_fallback(side, side, r)) < 1:
            problems.append("%s: random_resized_crop_param aspect %g..%g leaves no crop of a %dx%d image (its "
                            "fallback rectangle is %dx%d), expected min_aspect <= %g and max_aspect >= %g"
                            % ((where, r.min_aspect, r.max_aspect, side, side) + resized_crop_fallback(side, side, r)
                               + (2.0 * side, 0.5 / side)))
    if tp.HasField("random_erasing_param"):
        problems.extend(_erasing_problems(tp.random_erasing_param, where))
    return problems


def _rectangle_problems(r, field, where):
    """A random rectangle's area and aspect ranges and attempts (the random-resized crop's and
    random erasing's fields share names and rules)."""
    problems = []
    if not (_between(r.min_area, 0, 1) and r.min_area > 0 and _between(r.max_area, r.min_area, 1)):
        problems.append("%s: %s area is %g..%g, expected 0 < min_area <= max_area <= 1"
                        % (where, field, r.min_area, r.max_area))
    if not (_between(r.min_aspect, 0, math.inf) and r.min_aspect > 0 and _between(r.max_aspect, r.min_aspect,
                                                                                      math.inf)):
        problems.append("%s: %s aspect is %g..%g, expected 0 < min_aspect <= max_aspect"
                        % (where, field, r.min_aspect, r.max_aspect))
    if r.max_attempts < 1:
        problems.append("%s: %s.max_attempts is 0, expected >= 1" % (where, field))
    return problems


def _erasing_problems(e, where):
    """The CHECKs of patch 0018, said before a run: which field, what was expected."""
    problems = []
    if not _between(e.prob, 0, 1):
        problems.append("%s: random_erasing_param.prob is %g, expected a probability in [0, 1]" % (where, e.prob))
    problems.extend(_rectangle_problems(e, "random_erasing_param", where))
    if not math.isfinite(e.value):
        problems.append("%s: random_erasing_param.value is %g, expected a finite number" % (where, e.value))
    return problems
