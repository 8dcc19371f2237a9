"""The CPU a process runs on: its model name and the ISA extensions that set its matmul speed."""

import os
import pathlib
import platform

_ISA_FLAGS = (
    ("AMX", ("amx_tile", "amx_bf16")),
    ("AVX-512-BF16", ("avx512_bf16",)),
    ("AVX-512", ("avx512f",)),
    ("AVX2", ("avx2",)),
)
"""The ISA extensions that set a CPU's matmul speed, and the /proc/cpuinfo flags that show them."""


def cpu_info(cpuinfo: str | None = None) -> dict:
    """The CPU that figures are measured on: its model name, matmul ISA extensions and core count.

    **Arguments:**

    - `cpuinfo`: the text of ``/proc/cpuinfo``; None reads it. Where there is none (macOS,
      Windows) the model is ``platform.processor()`` and the ISA list is empty.

    **Returns:** ``{"model": str, "isa": list[str], "cores": int | None}``, e.g. ``{"model":
    "Intel(R) Xeon(R) Processor", "isa": ["AMX", "AVX-512-BF16", "AVX-512", "AVX2"], "cores": 2}``
    (``cores`` is ``os.cpu_count()``).
    """
    if cpuinfo is None:
        try:
            cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields = {}
    for line in cpuinfo.splitlines():  # the first processor's block is enough: all are alike
        name, colon, value = line.partition(":")
        if colon:
            fields.setdefault(name.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    model = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    isa = [name for name, needs in _ISA_FLAGS if flags.intersection(needs)]
    return {"model": model, "isa": isa, "cores": os.cpu_count()}
