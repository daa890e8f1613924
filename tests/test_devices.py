"""GPUs as CUDA counts them (nvidia-smi -L, CUDA_VISIBLE_DEVICES, MIG, WSL2) on recorded outputs,
and the CPUs a process may use (its affinity, not the machine's core count)."""
import os
import subprocess
import sys

import pytest

from tinycaffe import devices

# Recorded `nvidia-smi -L` outputs (UUIDs shortened to keep the lines short; the format is the driver's).
FOUR_GPUS = """GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-1a2b3c4d-0000-1111-2222-333344445555)
GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-2b3c4d5e-0000-1111-2222-333344445555)
GPU 2: NVIDIA A100-SXM4-80GB (UUID: GPU-3c4d5e6f-0000-1111-2222-333344445555)
GPU 3: NVIDIA A100-SXM4-80GB (UUID: GPU-4d5e6f70-0000-1111-2222-333344445555)
"""
MIG = """GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-9f8e7d6c-0000-1111-2222-333344445555)
  MIG 3g.40gb     Device  0: (UUID: MIG-aaaa1111-2222-5333-8444-555566667777)
  MIG 2g.20gb     Device  1: (UUID: MIG-bbbb1111-2222-5333-8444-555566667777)
  MIG 1g.10gb     Device  2: (UUID: MIG-cccc1111-2222-5333-8444-555566667777)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-8e7d6c5b-0000-1111-2222-333344445555)
"""
WSL2 = "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-0f1e2d3c-0000-1111-2222-333344445555)\n"


def test_parse_lists_gpus_and_their_mig_devices():
    gpus = devices.parse_gpu_list(MIG)
    assert [g["index"] for g in gpus] == [0, 1]
    assert [len(g["migs"]) for g in gpus] == [3, 0]
    assert gpus[0]["migs"][1] == "MIG-bbbb1111-2222-5333-8444-555566667777"
    assert devices.parse_gpu_list("No devices were found\n") == []


@pytest.mark.parametrize("text, visible, count", [
    (FOUR_GPUS, None, 4),                       # unset: every GPU
    (FOUR_GPUS, "", 0),                         # set but empty: none
    (FOUR_GPUS, "2", 1),                        # Slurm gives the job one GPU
    (FOUR_GPUS, "1,3", 2),
    (FOUR_GPUS, "0,7,1", 1),                    # CUDA stops at the first id that names no device
    (FOUR_GPUS, "1,1", 1),                      # ... or one already named
    (FOUR_GPUS, "NoDevFiles", 0),               # what some schedulers set for "no GPU"
    (FOUR_GPUS, "GPU-3c4d5e6f", 1),             # a UUID prefix
    (FOUR_GPUS, "GPU-3c4d5e6f-0000-1111-2222-333344445555,GPU-1a2b", 2),
    (MIG, None, 2),                             # GPU 1 plus one MIG device of GPU 0
    (MIG, "MIG-bbbb1111-2222-5333-8444-555566667777", 1),
    (MIG, "MIG-aaaa1111,MIG-cccc1111", 1),      # one CUDA process enumerates one MIG device
    (MIG, "1", 1),
    (WSL2, None, 1),
])
def test_cuda_device_count(text, visible, count):
    assert devices.cuda_device_count(devices.parse_gpu_list(text), visible) == count


def test_no_driver_means_no_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(devices, "NVIDIA_SMI_PLACES", ())
    assert devices.nvidia_smi() is None and devices.visible_gpus() == 0


def test_wsl2_nvidia_smi_outside_path_is_found(monkeypatch, tmp_path):
    """WSL2 has no /proc/driver/nvidia and keeps nvidia-smi in /usr/lib/wsl/lib."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf '%s'\n" % WSL2.strip())
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(devices, "NVIDIA_SMI_PLACES", (str(smi),))
    assert devices.visible_gpus() == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert devices.visible_gpus() == 0


def test_cpus_follow_the_affinity_not_the_core_count():
    """A process pinned to one CPU (taskset, a cgroup cpuset, Slurm --cpus-per-task) gets one
    OpenBLAS thread and one decode worker."""
    code = ("from tinycaffe import data, devices, train; "
            "print(devices.usable_cpus(), train.OPENBLAS_THREADS, data.default_workers())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1", "1"]
    assert devices.usable_cpus() == len(os.sched_getaffinity(0))
