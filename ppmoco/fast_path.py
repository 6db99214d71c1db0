"""Fast paths: what the CPU offers oneDNN (the model and instruction-set flags that decide its kernels,
recorded with every measurement, and whether it has bfloat16 units: bfloat16 training and evaluation),
and CheckedFastPath, which uses a fast path only where it has been checked against the plain one."""
import logging
import time

import numpy as np

logger = logging.getLogger("ppmoco")

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
        return {"model": None, "vendor": None, "flags": []}
    return parse_cpu_info(text)


def parse_cpu_info(text):
    """{"model": the first processor's model name, "vendor": its vendor_id, "flags": its flags among
    CPU_FLAGS, sorted} of the /proc/cpuinfo `text` (None and [] where it names none)."""
    info = {"model": None, "vendor": None, "flags": []}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and info["model"] is None:
            info["model"] = value.strip()
        elif key.strip() == "vendor_id" and info["vendor"] is None:
            info["vendor"] = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            info["flags"] = sorted(f for f in flags if f in CPU_FLAGS)
            break
    return info


def has_bfloat16_units(info):
    """Whether the CPU described by cpu_info() has bfloat16 matrix or vector units."""
    return any(flag in info["flags"] for flag in BF16_UNITS)


def mkl_code_path(info):
    """The environment that makes MKL run its AVX2 code on the CPU described by cpu_info(), {} where it
    needs none. MKL picks its kernels by CPU vendor: on an AMD CPU it runs its generic SSE code, which
    made Paddle's matrix products (MKL's sgemm: linear layers, attention, the contrastive logits) about
    2x slower than PyTorch's (docs/performance.md). The MKL that Paddle ships reads MKL_DEBUG_CPU_TYPE=5
    as "this CPU has AVX2"; it must be set before MKL's first call."""
    return {"MKL_DEBUG_CPU_TYPE": "5"} if info.get("vendor") == "AuthenticAMD" and "avx2" in info["flags"] else {}


def disagreement(expected, got, bound):
    """Why the outputs `got` are not eager's `expected` (both {name: tensor}), a short phrase, or None:
    max |got - expected| <= bound x max(1, max |expected|) for each floating output (relative to the
    largest value beyond 1, absolute below), equality for the others (labels, ranks)."""
    for name, want in expected.items():
        want, have = want.numpy(), got[name].numpy()
        if want.shape != have.shape or want.dtype != have.dtype:
            return f"{name} is {have.dtype}{list(have.shape)}, eager {want.dtype}{list(want.shape)}"
        if want.dtype.kind not in "fc":
            if not np.array_equal(want, have):
                return f"{name} differs from eager in {int((want != have).sum())} of {want.size} values"
            continue
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        diff = float(np.abs(have.astype("float64") - want).max(initial=0.0))
        if not diff <= bound * scale:  # also refuses NaN
            return f"{name} is {diff:.3g} off eager's (bound {bound * scale:.3g})"
    return None


class CheckedFastPath:
    """`plain(*args)`, run by a fast equivalent wherever that has been checked against it.

    The first call of each `key(*args)` runs plain, then the fast callable `fast_for(args, plain's
    result)` gives (the result tells it the outputs' names, say), and compares them: `compare(expected,
    got)` is why they differ, a short phrase, or None. Agreed: that fast callable serves the key until
    reset() (`checked`). Not, or fast_for or the fast callable raised: the fast path is dropped for good
    (`failed` says why) and plain serves every call, this one included. One log line each: info for the
    first check passed (debug after), a warning for the drop, worded from `name`, `detail`, `target`,
    `describe(key)` and, for an exception, `fast_name` (see __call__). They call plain eager and its
    switch Engine.execution=eager, as they are for every fast path here.
    """

    def __init__(self, plain, fast_for, compare, key, describe, *, name, detail, target, fast_name):
        self.plain, self.fast_for, self.compare = plain, fast_for, compare
        self.key, self.describe = key, describe
        self.name, self.detail, self.target, self.fast_name = name, detail, target, fast_name
        self.checked = {}  # key -> the fast callable that passed its check
        self.failed = None  # why the fast path was dropped
        self.announced = False  # a check that passed was logged at info level

    def reset(self):
        """Forget the checked fast callables (e.g. they hold weights that have changed since); a dropped
        fast path stays dropped."""
        self.checked = {}

    def __call__(self, *args):
        if self.failed is not None:
            return self.plain(*args)
        key = self.key(*args)
        if key in self.checked:
            return self.checked[key](*args)
        started = time.perf_counter()
        expected = self.plain(*args)
        try:
            fast = self.fast_for(args, expected)
            got = fast(*args)
        except Exception as err:  # noqa: BLE001 - a failing fast path (native code, say) is reported, not fatal
            lines = str(err).strip().splitlines()
            why = f"{self.fast_name} failed ({type(err).__name__}: {lines[-1] if lines else 'no message'})"
        else:
            why = self.compare(expected, got)
        if why is None:
            self.checked[key] = fast
            (logger.debug if self.announced else logger.info)(
                f"{self.name} ({self.detail}) checked against eager for {self.target}, {self.describe(key)} "
                f"({time.perf_counter() - started:.1f} s)")
            self.announced = True
            return got
        self.failed, self.checked = why, {}  # the fast callables are never called again: let them go
        logger.warning(f"{self.name} not used for {self.target}: {why} ({self.describe(key)}); it runs eagerly "
                       "(Engine.execution=eager skips this check)")
        return expected
