"""The machine and library versions, recorded with every result."""

import datetime
import importlib.metadata
import os
import platform


def machine() -> dict:
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    gpu = "none"
    try:
        import torch
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    libs = {}
    for lib in ("ray", "torch", "pyarrow", "mlflow", "transformers", "diffusers"):
        try:
            libs[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1), "gpu": gpu,
            "python": platform.python_version(), "platform": platform.platform(),
            "libraries": libs, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}
