"""What this process may compute on: the GPUs CUDA will enumerate, and the CPUs it may run on.

GPUs are counted the way CUDA counts them, from `nvidia-smi -L` (which lists every GPU
and MIG device the driver has, and exists on WSL2 where /proc/driver/nvidia does not),
filtered by CUDA_VISIBLE_DEVICES as the CUDA runtime filters it (Slurm, Docker and
Kubernetes set it):
- unset: every device; set but empty: none;
- entries are indices (0), GPU UUIDs (GPU-...) or MIG UUIDs (MIG-...), a unique prefix
  of a UUID being enough; the list ends at the first entry that names no device (or one
  already named), as CUDA stops there;
- a GPU in MIG mode is used through its MIG devices, and one CUDA process enumerates at
  most one MIG device (NVIDIA's MIG user guide, "CUDA device enumeration").
"""
import os
import re
import shutil
import subprocess

NVIDIA_SMI_PLACES = ("/usr/lib/wsl/lib/nvidia-smi",)  # WSL2 puts it here, outside PATH
GPU_LINE = re.compile(r"^GPU (\d+): .*\(UUID: (GPU-[0-9A-Fa-f-]+)\)\s*$")
MIG_LINE = re.compile(r"^\s+MIG .*Device\s+(\d+): \(UUID: (MIG-[^)\s]+)\)\s*$")


def nvidia_smi():
    """Path of nvidia-smi, or None without an NVIDIA driver."""
    found = shutil.which("nvidia-smi")
    if found:
        return found
    return next((p for p in NVIDIA_SMI_PLACES if os.access(p, os.X_OK)), None)


def parse_gpu_list(text):
    """`nvidia-smi -L` -> [{"index", "uuid", "migs": [uuid, ...]}] in the driver's order."""
    gpus = []
    for line in text.splitlines():
        m = GPU_LINE.match(line)
        if m:
            gpus.append({"index": int(m.group(1)), "uuid": m.group(2), "migs": []})
            continue
        m = MIG_LINE.match(line)
        if m and gpus:
            gpus[-1]["migs"].append(m.group(2))
    return gpus


def _pick(entry, gpus):
    """The GPU an entry of CUDA_VISIBLE_DEVICES names (index, or UUID prefix); a MIG UUID
    gives (gpu, mig uuid). None when it names nothing or is ambiguous."""
    entry = entry.strip()
    if re.fullmatch(r"\d+", entry):
        index = int(entry)
        return (gpus[index], None) if index < len(gpus) else None
    if entry.startswith("MIG-"):
        hits = [(g, m) for g in gpus for m in g["migs"] if m.startswith(entry)]
    elif entry.startswith("GPU-"):
        hits = [(g, None) for g in gpus if g["uuid"].startswith(entry)]
    else:
        return None
    return hits[0] if len(hits) == 1 else None


def cuda_device_count(gpus, visible=None):
    """How many devices CUDA enumerates for the GPUs of parse_gpu_list, given
    CUDA_VISIBLE_DEVICES (None: the variable is unset)."""
    if visible is None:
        chosen = [(g, None) for g in gpus]
    else:
        chosen, seen = [], set()
        for entry in visible.split(",") if visible.strip() else []:
            hit = _pick(entry, gpus)
            key = hit and (hit[0]["uuid"], hit[1])
            if hit is None or key in seen:
                break
            seen.add(key)
            chosen.append(hit)
    plain = sum(1 for g, mig in chosen if mig is None and not g["migs"])
    migs = any(mig is not None or g["migs"] for g, mig in chosen)
    return plain + (1 if migs else 0)


def visible_gpus():
    """How many GPUs CUDA will enumerate in this process (0 without a driver)."""
    smi = nvidia_smi()
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    if out.returncode != 0:
        return 0
    return cuda_device_count(parse_gpu_list(out.stdout), os.environ.get("CUDA_VISIBLE_DEVICES"))


def usable_cpus():
    """The CPUs this process may run on (cgroup cpusets, taskset, Slurm's --cpus-per-task),
    not every core of the machine as os.cpu_count() says."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1
