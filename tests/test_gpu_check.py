"""The GPU check's fast parts, on CPU: the MultiBox loss through the GPU's tensor code agrees with the CPU's
compiled kernels, and the device FPS measurement runs. (The whole check, training included, is run on CPU by
``python -m benchmarks.gpu_check --device cpu --tiny``: minutes, so not in the suite.)"""

from __future__ import annotations

import torch

from benchmarks.gpu_check import inference_fps, loss_paths
from maskssd.ssd import kernels


def test_tensor_loss_path_agrees_with_the_cpu_kernels():
    r = loss_paths(torch.device("cpu"), batch=4, repeats=1)
    assert r["agree"], r["parts_cpu_vs_device"]
    assert r["device_path"].startswith("tensor") and r["cpu_kernels_ms"] > 0 and r["device_ms"] > 0
    assert kernels.ENABLED  # restored


def test_device_fps_measures_batch_one_and_batched():
    r = inference_fps(torch.device("cpu"), repeats=1, batch=2)
    assert r["batch1_fps"] > 0 and r["batched_images_per_s"] > 0
