"""The machine doctor judges: its GPUs, CUDA build, memory and CPU, asked of the hardware module once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from llmctl.core import hardware
from llmctl.doctor.fit import Precision


@dataclass(frozen=True)
class Machine:
    """The hardware facts the checks judge, gathered in one place (tests build it by hand)."""

    cuda_build: str | None
    driver: str | None
    cuda_available: bool
    cuda_error: str | None
    gpus: tuple[hardware.GPUDevice, ...]
    cpu_cores: int
    ram_total: int
    ram_available: int
    cpu_flags: frozenset[str]
    cuda_hidden: bool = False

    @property
    def device(self) -> Literal["cuda", "cpu"]:
        return "cuda" if self.gpus else "cpu"

    @property
    def cpu_bf16(self) -> bool:
        return bool({"avx512_bf16", "amx_bf16"} & self.cpu_flags)

    @property
    def default_precision(self) -> Precision:
        """What `llmctl serve --dtype auto` picks here, by the rule of core.loader.resolve_dtype.

        On CUDA that is hardware.bf16_supported: torch.cuda.is_bf16_supported(including_emulation=False),
        which asks the current device (the first visible GPU) for compute capability 8.0 or more, and
        says yes on any ROCm build. GPUDevice.bf16 is that same capability test.
        """
        if self.gpus:
            rocm = (self.cuda_build or "").startswith("ROCm")
            return "bf16" if rocm or self.gpus[0].bf16 else "fp16"
        return "bf16" if self.cpu_bf16 else "fp32"

    @property
    def available_bytes(self) -> int:
        return sum(g.free_bytes for g in self.gpus) if self.gpus else self.ram_available


def probe_machine() -> Machine:
    """Ask the hardware module; the only place doctor touches CUDA."""
    available = hardware.torch_cuda_available()
    total, free = hardware.ram_bytes()
    return Machine(
        cuda_build=hardware.torch_cuda_build(),
        driver=hardware.nvidia_driver_version(),
        cuda_available=available,
        cuda_error=None if available else hardware.cuda_init_error(),
        gpus=hardware.gpu_devices() if available else (),
        cpu_cores=hardware.cpu_cores(),
        ram_total=total,
        ram_available=free,
        cpu_flags=frozenset(hardware.cpu_flags()),
        cuda_hidden=os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"),
    )
