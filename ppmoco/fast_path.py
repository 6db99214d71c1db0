"""Where the CPU fast path runs, shared by training (ppmoco/engine/static_step.py) and evaluation
(ppmoco/eval/static_inference.py): the setting it needs, and what the CPU offers oneDNN."""

# Instruction-set flags that decide which oneDNN kernels run: recorded with every measurement.
CPU_FLAGS = {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}
BF16_UNITS = ("avx512_bf16", "amx_bf16")  # the flags of the bfloat16 units oneDNN uses


def cpu_info():
    """The CPU model and the instruction-set flags that decide oneDNN's kernels (Linux)."""
    info = {"model": None, "flags": []}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return info
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


def static_unsupported_reason(env, mix_precision):
    """Why Engine.execution=static cannot run in this setting (a config error message), or None.
    `env` is the RunEnv, `mix_precision` Engine.mix_precision."""
    if env.world_size > 1:
        return ("Engine.execution: static runs one process (use its threads instead); "
                f"{env.world_size} were launched; set Engine.execution=eager or auto")
    if env.device != "cpu":
        return "Engine.execution: static is the CPU fast path; on GPU set Engine.execution=eager or auto"
    if mix_precision["enable"] and mix_precision["dtype"] != "bfloat16":
        return ("Engine.execution: static runs float32, or bfloat16 convolutions (Engine.mix_precision.dtype "
                "bfloat16); set Engine.mix_precision.enable=false or Engine.execution=eager")
    return None
