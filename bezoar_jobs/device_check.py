"""No silent CPU: a stage whose pod asked for GPUs must get CUDA, or stop at once (exit 2).

With ``training.quantization: auto`` and ``precision: auto`` a training stage picks QLoRA on CUDA and
plain fp32 LoRA on CPU. That is right on a laptop and wrong in a GPU pod: a pod that was given a GPU
but cannot initialise CUDA (a driver older than the CUDA build of torch needs, a CPU-only torch
wheel, a device plugin that did not expose the device) would train a 3B model on CPU until its
deadline, two days later. The Job builder sets ``BEZOAR_GPUS`` on every pod that requests GPUs; the
runner calls :func:`check` before a stage starts, and a pod that cannot use that many CUDA devices
exits 2 (bad input: a retry on the same node cannot help) with the facts needed to fix it: torch's
version and CUDA build, the CUDA error, the node's driver version and the newest CUDA it supports.

The driver is read without CUDA: ``/proc/driver/nvidia/version`` (mounted into GPU containers by the
NVIDIA container toolkit), else ``nvmlSystemGetDriverVersion`` from ``libnvidia-ml.so.1``; the newest
CUDA the driver supports from ``cuDriverGetVersion`` in ``libcuda.so.1``. Outside a GPU pod
(``BEZOAR_GPUS`` unset or 0) nothing is checked and torch is not imported.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import BadInput

GPUS_ENV = "BEZOAR_GPUS"
PROC_VERSION = "/proc/driver/nvidia/version"

# The oldest Linux driver each CUDA major version runs on (CUDA's minor-version compatibility, which
# PyTorch's wheels rely on: they bundle their CUDA runtime). A newer minor release may need a newer
# driver for new GPUs (e.g. Blackwell needs 570+); docs/kubernetes.md has the table.
MIN_DRIVER = {"11": "450.80.02", "12": "525.60.13", "13": "580.65.06"}


@dataclass(frozen=True)
class DeviceFacts:
    torch_version: str
    torch_cuda: str | None  # CUDA version torch was built for (None: a CPU-only build)
    cuda_available: bool
    device_count: int
    cuda_error: str  # why CUDA could not be initialised ("" when it could)
    driver: str | None  # NVIDIA driver version, e.g. 535.104.05
    driver_cuda: str | None  # newest CUDA the driver supports, e.g. 12.2


def requested_gpus(environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    raw = env.get(GPUS_ENV, "").strip()
    if not raw:
        return 0
    try:
        n = int(raw)
    except ValueError:
        raise BadInput(f"{GPUS_ENV}={raw!r}: expected a number of GPUs") from None
    return max(0, n)


def driver_version(proc_path: str = PROC_VERSION) -> str | None:
    """The NVIDIA kernel driver's version, or None when no driver is visible."""
    try:
        with open(proc_path, encoding="utf-8", errors="replace") as f:
            m = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?([0-9]+\.[0-9]+(?:\.[0-9]+)?)", f.read())
            if m:
                return m.group(1)
    except OSError:
        pass
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() == 0:
            buf = ctypes.create_string_buffer(96)
            try:
                if nvml.nvmlSystemGetDriverVersion(buf, ctypes.c_uint(96)) == 0:
                    return buf.value.decode()
            finally:
                nvml.nvmlShutdown()
    except (OSError, AttributeError):
        pass
    return None


def driver_cuda_version() -> str | None:
    """The newest CUDA version the installed driver supports (``cuDriverGetVersion``), or None."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int(0)
        if cuda.cuDriverGetVersion(ctypes.byref(v)) == 0 and v.value:
            return f"{v.value // 1000}.{(v.value % 1000) // 10}"
    except (OSError, AttributeError):
        pass
    return None


def gather(torch_module: Any = None) -> DeviceFacts:  # noqa: ANN401 - the torch module
    """What torch and the node say about CUDA (imports torch unless given a stand-in)."""
    if torch_module is None:
        import torch
    else:
        torch = torch_module
    error = ""
    available = bool(torch.cuda.is_available())
    if not available and torch.version.cuda:
        try:
            torch.cuda.init()
        except Exception as e:  # the reason torch gives (driver too old, no device, ...)
            error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    count = int(torch.cuda.device_count()) if available else 0
    return DeviceFacts(str(torch.__version__), torch.version.cuda, available, count, error,
                       driver_version(), driver_cuda_version())


def problem(n: int, facts: DeviceFacts) -> str | None:
    """Why ``n`` requested GPUs cannot be used, or None when they can."""
    if facts.cuda_available and facts.device_count >= n:
        return None
    driver = facts.driver or f"none visible ({PROC_VERSION} is missing: no NVIDIA driver in this container)"
    drv_cuda = facts.driver_cuda or "unknown"
    if facts.torch_cuda is None:
        return (f"this pod requested {n} GPU(s) ({GPUS_ENV}={n}) but torch {facts.torch_version} is a CPU-only "
                f"build: the image must install a CUDA build of torch (build argument TORCH_CUDA of "
                f"images/train and images/eval). NVIDIA driver: {driver}, supporting CUDA up to {drv_cuda}")
    need = MIN_DRIVER.get(facts.torch_cuda.split(".")[0], "?")
    if facts.cuda_available:
        what = f"only {facts.device_count} CUDA device(s) are visible"
    else:
        what = "CUDA cannot be initialised" + (f" ({facts.cuda_error})" if facts.cuda_error else "")
    return (f"this pod requested {n} GPU(s) ({GPUS_ENV}={n}) but {what}: torch {facts.torch_version} is built for "
            f"CUDA {facts.torch_cuda} (needs NVIDIA driver >= {need}); the node's NVIDIA driver: {driver}, "
            f"supporting CUDA up to {drv_cuda}. Not falling back to CPU: use a node with a newer driver, or an "
            f"image built for an older CUDA (TORCH_CUDA build argument); see docs/kubernetes.md")


def check(environ: Mapping[str, str] | None = None, facts: Callable[[], DeviceFacts] = gather) -> None:
    """Raise BadInput (exit 2) when the pod requested GPUs that this process cannot use."""
    n = requested_gpus(environ)
    if n <= 0:
        return
    why = problem(n, facts())
    if why is not None:
        raise BadInput(why)
