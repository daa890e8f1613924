"""Check hand-edited prototxt before a GPU hour is wasted.

1. Parse with Caffe's caffe_pb2 + text_format: a typo is reported as FILE:LINE:COL.
2. Build the net with real Caffe on CPU, in a child process: Caffe reports shape
   errors through glog CHECKs that abort the process, so the child's log is read
   back and the failure is reported with the layer it happened in.
   Data layers are swapped for DummyData of the same shape, so no LMDB is needed.
3. Print a table per layer: output shape, parameters, forward MFLOPs per image.
4. For a train_val/deploy pair in one folder: layers whose names or parameter
   shapes differ (weights would not transfer).
"""
import json
import os
import re
import subprocess
import sys
import tempfile

from google.protobuf import text_format

from . import fit, prechecks
from .caffe_env import caffe_pb2
from .files import PrototxtError, parse_prototxt

DATA_LAYER_TYPES = ("Data", "ImageData", "HDF5Data", "WindowData")
DEFAULT_DATA_SIDE = 64  # an LMDB Datum's side when the source cannot be read
SOLVER_FIELDS = re.compile(r"^\s*(base_lr|lr_policy|net|train_net|test_net|max_iter|snapshot_prefix)\s*:", re.M)


class CheckError(Exception):
    pass


# ---------------------------------------------------------------- parsing
def parse(path):
    """-> ("net" | "solver", message). Raises CheckError naming FILE:LINE:COL."""
    try:
        with open(path) as f:
            text = f.read()
        pb2 = caffe_pb2()
        kind = "solver" if SOLVER_FIELDS.search(text) and not re.search(r"^\s*layers?\s*\{", text, re.M) else "net"
        message = parse_prototxt(path, text, pb2.SolverParameter() if kind == "solver" else pb2.NetParameter())
    except OSError as exc:
        raise CheckError("%s: cannot read (%s)" % (path, exc.strerror)) from exc
    except PrototxtError as exc:
        raise CheckError(str(exc)) from exc
    return kind, message


def is_train_val(net):
    return any(layer.type in DATA_LAYER_TYPES for layer in net.layer)


# ---------------------------------------------------------------- building (child process)
def _datum_side(source):
    """(channels, height, width) of the first Datum of an LMDB, or None when it cannot be read."""
    try:
        return fit.image_shape(source)
    except Exception:
        return None


def with_dummy_data(net, warnings, base=None):
    """A copy of net whose Data layers are DummyData of the shape they would produce (relative
    sources read from base, default the current directory)."""
    pb2 = caffe_pb2()
    out = pb2.NetParameter()
    out.CopyFrom(net)
    for layer in out.layer:
        if layer.type not in DATA_LAYER_TYPES:
            continue
        source = fit.resolved_source(layer, base or os.getcwd())
        batch = layer.data_param.batch_size or 1
        shape = _datum_side(source) if source and os.path.isdir(source) else None
        if shape is None:
            if source:
                warnings.append("layer '%s': source %s is not readable yet; assuming 3x%dx%d images"
                                % (layer.name, source, DEFAULT_DATA_SIDE, DEFAULT_DATA_SIDE))
            shape = (3, DEFAULT_DATA_SIDE, DEFAULT_DATA_SIDE)
        c, h, w = shape
        crop = layer.transform_param.crop_size
        if crop:
            h = w = crop
        tops = list(layer.top)
        include = list(layer.include)
        name = layer.name
        layer.Clear()
        layer.name, layer.type = name, "DummyData"
        layer.top.extend(tops)
        layer.include.extend(include)
        p = layer.dummy_data_param
        p.shape.add().dim.extend([batch, c, h, w])
        p.data_filler.add(type="gaussian", std=1.0)
        if len(tops) > 1:
            p.shape.add().dim.extend([batch])
            p.data_filler.add(type="constant", value=0)
    return out


def inspect_net(path, phase_name):
    """Runs in the child: build the net, return a per-layer table (list of dicts)."""
    import caffe
    caffe.set_mode_cpu()
    _, net_param = parse(path)
    warnings = []
    patched = with_dummy_data(net_param, warnings, fit.base_for(path))
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
        f.write(text_format.MessageToString(patched))
    try:
        net = caffe.Net(f.name, getattr(caffe, phase_name))
    finally:
        os.unlink(f.name)
    batch = None
    rows = []
    for name, layer in zip(net._layer_names, net.layers):
        if layer.type == "Split":  # inserted by Caffe for blobs with several consumers, not the user's
            continue
        tops = net.top_names[name]
        shapes = [list(net.blobs[t].data.shape) for t in tops]
        if batch is None and shapes and shapes[0]:
            batch = shapes[0][0] or 1
        params = [list(b.data.shape) for b in net.params[name]] if name in net.params else []
        rows.append({"name": name, "type": layer.type, "tops": shapes, "params": params,
                     "flops": layer_flops(layer.type, shapes, params)})
    return {"layers": rows, "warnings": warnings, "batch": batch or 1}


def layer_flops(kind, top_shapes, params):
    """Forward FLOPs per image (a multiply-add counts 2) for the layers that dominate."""
    if not params or not top_shapes:
        return 0
    out_per_image = 1
    for d in top_shapes[0][1:]:
        out_per_image *= d
    w = params[0]
    if kind in ("Convolution", "Deconvolution") and len(w) == 4:
        return 2 * out_per_image * w[1] * w[2] * w[3]
    if kind == "InnerProduct" and len(w) == 2:
        return 2 * w[0] * w[1]
    return 0


FATAL = re.compile(r"^F\d{4,8} [\d:.]+\s+\d+ ([\w.]+:\d+)\] (.*)$")  # glog: Fyyyymmdd hh:mm:ss.us tid file:line] msg
CREATING = re.compile(r"Creating [Ll]ayer (\S+)")


def explain_abort(stderr):
    """From a Caffe child's log: (layer name or None, the CHECK message)."""
    layer, message = None, None
    for line in stderr.splitlines():
        m = CREATING.search(line)
        if m:
            layer = m.group(1)
        m = FATAL.match(line)
        if m:
            message = m.group(2).strip()
            break
    if message is None:
        tail = [line for line in stderr.strip().splitlines() if line.strip()]
        message = tail[-1] if tail else "Caffe exited without a message"
    return layer, message


def build_in_child(path, phase_name):
    """Build in a fresh interpreter; a glog abort there becomes a CheckError here."""
    env = dict(os.environ, GLOG_minloglevel="0", GLOG_logtostderr="1")
    proc = subprocess.run([sys.executable, "-m", "tinycaffe.check", "--inspect", path, phase_name],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        layer, message = explain_abort(proc.stderr)
        where = "layer '%s'" % layer if layer else "net"
        raise CheckError("%s (%s): %s: %s" % (path, phase_name, where, message))
    marker = proc.stdout.rfind("\n@@JSON@@")
    return json.loads(proc.stdout[marker + len("\n@@JSON@@"):])


# ---------------------------------------------------------------- reports
def format_table(path, phase, info):
    lines = ["%s [%s, batch %d]" % (path, phase, info["batch"]),
             "  %-18s %-16s %-22s %12s %10s" % ("layer", "type", "output", "params", "MFLOPs/img")]
    total_params = total_flops = 0
    for row in info["layers"]:
        n_params = sum(prod(p) for p in row["params"])
        total_params += n_params
        total_flops += row["flops"]
        out = " ".join("x".join(str(d) for d in s) for s in row["tops"])
        lines.append("  %-18s %-16s %-22s %12s %10s" % (row["name"], row["type"], out,
                                                       "{:,}".format(n_params) if n_params else "",
                                                       "%.1f" % (row["flops"] / 1e6) if row["flops"] else ""))
    lines.append("  total: {:,} parameters, {:.1f} MFLOPs per image (forward)".format(total_params, total_flops / 1e6))
    return "\n".join(lines), total_params, total_flops


def prod(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def compare_pair(train_val_path, tv_info, deploy_path, dp_info):
    """Problems where weights of train_val would not load into deploy."""
    tv = {r["name"]: r["params"] for r in tv_info["layers"] if r["params"]}
    dp = {r["name"]: r["params"] for r in dp_info["layers"] if r["params"]}
    problems = []
    for name in sorted(set(tv) - set(dp)):
        problems.append("%s: layer '%s' has parameters in train_val but is missing from %s"
                        % (deploy_path, name, deploy_path))
    for name in sorted(set(dp) - set(tv)):
        problems.append("%s: layer '%s' has parameters but no layer of that name in %s (its weights stay random)"
                        % (deploy_path, name, train_val_path))
    for name in sorted(set(tv) & set(dp)):
        if tv[name] != dp[name]:
            problems.append("%s: layer '%s' parameter shapes %s differ from %s's %s"
                            % (deploy_path, name, dp[name], train_val_path, tv[name]))
    return problems


def check_solver(path, message):
    """The solver's summary line, and the problems a run's pre-check finds in it and in the net it
    names (its data, fit and augmentation: the same list, prechecks.all_problems)."""
    problems, _, _ = prechecks.all_problems(message, path, fit.base_for(path), need_data=False)
    steps = ("stepvalue %s" % ",".join(map(str, message.stepvalue)) if message.lr_policy == "multistep"
             else "stepsize %d" % message.stepsize)
    summary = ("%s: solver %s, base_lr %g, lr_policy %s (%s, gamma %g), max_iter %d, %s mode"
               % (path, message.type or "SGD", message.base_lr, message.lr_policy, steps,
                  message.gamma, message.max_iter, "GPU" if message.solver_mode == 1 else "CPU"))
    return summary, problems


def check_files(paths, out=print, lmdb_dir=None):
    """Check every file; print tables and problems; return the list of problems."""
    problems, nets = [], {}
    for path in paths:
        try:
            kind, message = parse(path)
        except CheckError as exc:
            problems.append(str(exc))
            continue
        if kind == "solver":
            summary, found = check_solver(path, message)
            out(summary)
            problems.extend(found)
            continue
        problems.extend(prechecks.net_problems(message, path, fit.base_for(path), need_data=False, lmdb_dir=lmdb_dir))
        phases = ("TRAIN", "TEST") if is_train_val(message) else ("TEST",)
        notes = []
        for phase in phases:
            try:
                info = build_in_child(path, phase)
            except CheckError as exc:
                problems.append(str(exc))
                break
            table, _, _ = format_table(path, phase, info)
            out(table)
            notes.extend(w for w in info["warnings"] if w not in notes)
            if phase == "TEST":
                nets[path] = (is_train_val(message), info)
        for note in notes:
            out("  note: " + note)
    problems = list(dict.fromkeys(problems))  # a net checked on its own and through its solver: said once
    by_dir = {}
    for path, (tv, info) in nets.items():
        by_dir.setdefault(os.path.dirname(os.path.abspath(path)), {})["train_val" if tv else "deploy"] = (path, info)
    for pair in by_dir.values():
        if "train_val" in pair and "deploy" in pair:
            found = compare_pair(pair["train_val"][0], pair["train_val"][1], pair["deploy"][0], pair["deploy"][1])
            if not found:
                out("%s and %s: same layer names and parameter shapes" % (pair["train_val"][0], pair["deploy"][0]))
            problems.extend(found)
    return problems


def _child_main(argv):
    path, phase = argv
    info = inspect_net(path, phase)
    sys.stdout.write("\n@@JSON@@" + json.dumps(info))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--inspect":
        sys.exit(_child_main(sys.argv[2:]))
    sys.exit("usage: python -m tinycaffe.check --inspect FILE PHASE (internal; use tools/gen_prototxt.py --check)")
