"""What the CPU offers oneDNN: the model and instruction-set flags that decide its kernels (recorded
with every measurement) and whether it has bfloat16 units (bfloat16 training and evaluation)."""

# Instruction-set flags that decide which oneDNN kernels run: recorded with every measurement.
CPU_FLAGS = {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}
BF16_UNITS = ("avx512_bf16", "amx_bf16")  # the flags of the bfloat16 units oneDNN uses


def cpu_info():
    """The CPU model and the instruction-set flags that decide oneDNN's kernels (Linux's /proc/cpuinfo;
    no model and no flags where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return {"model": None, "flags": []}
    return parse_cpu_info(text)


def parse_cpu_info(text):
    """{"model": the first processor's model name, "flags": its flags among CPU_FLAGS, sorted} of the
    /proc/cpuinfo `text` (None and [] where it names none)."""
    info = {"model": None, "flags": []}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and info["model"] is None:
            info["model"] = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            info["flags"] = sorted(f for f in flags if f in CPU_FLAGS)
            break
    return info


def has_bfloat16_units(info):
    """Whether the CPU described by cpu_info() has bfloat16 matrix or vector units."""
    return any(flag in info["flags"] for flag in BF16_UNITS)
