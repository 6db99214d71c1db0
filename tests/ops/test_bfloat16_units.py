"""Whether the CPU has bfloat16 units decides whether the bfloat16 tests run, and ppmoco.fast_path
decides it: cpu_info() on /proc/cpuinfo texts written here, the tests' skip
(optional_deps.bfloat16_units_or_skip) and CI's PPMOCO_REQUIRE_BF16 switch, which turns that skip
into a failure where /proc/cpuinfo lists the units; and MKL's code path on AMD CPUs, which the same
/proc/cpuinfo decides. Each test names the mutation it catches."""
import io
import os
import subprocess

import pytest

from ppmoco import fast_path

import optional_deps
from optional_deps import BF16_SWITCH as SWITCH
from optional_deps import bfloat16_units_or_skip

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def processor(number, model, flags, vendor="GenuineIntel"):
    """One processor's block of /proc/cpuinfo as Linux writes it (tab-aligned keys; a "vmx flags" line
    after "flags" on Intel)."""
    return (f"processor\t: {number}\nvendor_id\t: {vendor}\ncpu family\t: 6\nmodel\t\t: 143\n"
            f"model name\t: {model}\nstepping\t: 8\ncpu MHz\t\t: 2000.000\ncache size\t: 107520 KB\n"
            f"fpu\t\t: yes\nflags\t\t: {flags}\nvmx flags\t: vnmi preemption_timer invvpid ept_x_only\n"
            f"bugs\t\t: spectre_v1 spectre_v2\nbogomips\t: 4000.00\n\n")


SAPPHIRE_RAPIDS = "Intel(R) Xeon(R) Platinum 8480+"
SAPPHIRE_RAPIDS_FLAGS = ("fpu vme de pse tsc msr pae mce cx8 apic sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c "
                         "avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 "
                         "avx512_fp16 amx_tile amx_int8 arch_capabilities")
SKYLAKE = "Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz"
SKYLAKE_FLAGS = "fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl"
TWO_SAPPHIRE_RAPIDS = processor(0, SAPPHIRE_RAPIDS, SAPPHIRE_RAPIDS_FLAGS) + processor(
    1, SAPPHIRE_RAPIDS, SAPPHIRE_RAPIDS_FLAGS)


AVX2 = {"MKL_DEBUG_CPU_TYPE": "5"}  # MKL's AVX2 code on an AMD CPU


@pytest.mark.parametrize("text, model, vendor, flags, units, mkl", [
    pytest.param(TWO_SAPPHIRE_RAPIDS, SAPPHIRE_RAPIDS, "GenuineIntel",
                 ["amx_bf16", "amx_int8", "amx_tile", "avx2", "avx512_bf16", "avx512_vnni", "avx512f", "fma"], True,
                 {}, id="sapphire_rapids"),
    pytest.param(processor(0, SKYLAKE, SKYLAKE_FLAGS), SKYLAKE, "GenuineIntel", ["avx2", "avx512f", "fma"], False, {},
                 id="skylake"),
    pytest.param(processor(0, "AMD EPYC 9654", "fpu sse2 avx2 fma avx512f avx512_bf16", "AuthenticAMD"),
                 "AMD EPYC 9654", "AuthenticAMD", ["avx2", "avx512_bf16", "avx512f", "fma"], True, AVX2,
                 id="zen4_avx512_bf16_only"),
    pytest.param(processor(0, "AMD EPYC 7B12", "fpu sse2 avx2 fma", "AuthenticAMD"), "AMD EPYC 7B12", "AuthenticAMD",
                 ["avx2", "fma"], False, AVX2, id="zen2_avx2"),
    pytest.param(processor(0, "AMD Opteron(tm) Processor 6174", "fpu sse2 sse4a", "AuthenticAMD"),
                 "AMD Opteron(tm) Processor 6174", "AuthenticAMD", [], False, {}, id="amd_without_avx2"),
    pytest.param(processor(0, "Emulated", "fpu sse2 amx_bf16"), "Emulated", "GenuineIntel", ["amx_bf16"], True, {},
                 id="amx_bf16_only"),
    pytest.param("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd bf16\n", None, None, [], False, {},
                 id="arm64_no_such_keys"),
])
def test_cpu_info_reads_the_model_and_the_flags_of_proc_cpuinfo(monkeypatch, text, model, vendor, flags, units, mkl):
    # Catches: the key "flags" misread (e.g. "flag": no line matches, no flags, and every bfloat16
    # test skips), "model name" or "vendor_id" misread, flags kept that CPU_FLAGS lacks, a flag dropped from
    # CPU_FLAGS or BF16_UNITS, the file's name changed; MKL told "AVX2" on an Intel CPU (its AVX-512 code
    # would give way to AVX2) or on an AMD CPU without AVX2 (illegal instructions), or not on an AMD one.
    def fake_open(path, *args, **kwargs):
        assert path == "/proc/cpuinfo"
        return io.StringIO(text)

    monkeypatch.setattr(fast_path, "open", fake_open, raising=False)
    info = fast_path.cpu_info()
    assert info == {"model": model, "vendor": vendor, "flags": flags}
    assert fast_path.parse_cpu_info(text) == info
    assert fast_path.has_bfloat16_units(info) is units
    assert fast_path.mkl_code_path(info) == mkl


def test_cpu_info_without_proc_cpuinfo_is_no_model_and_no_flags(monkeypatch):
    def fake_open(path, *args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", path)

    monkeypatch.setattr(fast_path, "open", fake_open, raising=False)
    info = fast_path.cpu_info()
    assert info == {"model": None, "vendor": None, "flags": []} and not fast_path.has_bfloat16_units(info)
    assert fast_path.mkl_code_path(info) == {}


@pytest.mark.parametrize("vendor, preset, expected", [
    ("AuthenticAMD", None, "5"), ("AuthenticAMD", "0", "0"), ("GenuineIntel", None, None),
])
def test_a_cpu_process_sets_mkls_code_path_before_its_first_call_and_keeps_the_users(monkeypatch, vendor, preset,
                                                                                       expected):
    # Catches the setting left out of setup_environment (every tool's start), a user's value overwritten, and
    # the setting applied to an Intel CPU.
    from ppmoco.engine import env

    monkeypatch.setattr(env, "cpu_info", lambda: {"model": "Test CPU", "vendor": vendor, "flags": ["avx2", "fma"]})
    if preset is None:
        monkeypatch.delenv("MKL_DEBUG_CPU_TYPE", raising=False)
    else:
        monkeypatch.setenv("MKL_DEBUG_CPU_TYPE", preset)
    env.setup_environment({"device": "cpu", "flags": {}, "num_threads": 1, "seed": 0}, {})
    assert os.environ.get("MKL_DEBUG_CPU_TYPE") == expected


@pytest.mark.parametrize("flags, switch, outcome", [
    (["avx2", "amx_bf16"], "1", "run"), (["avx512_bf16"], None, "run"),
    (["avx2", "avx512f"], None, "skip"), (["avx2", "avx512f"], "0", "skip"), (["avx2", "avx512f"], "1", "fail"),
    ([], "1", "fail"),
])
def test_the_bfloat16_skip_is_a_failure_under_the_switch(monkeypatch, flags, switch, outcome):
    # Catches: the switch not read (or read under another name), so a cpu_info() that sees no units
    # skips every bfloat16 test in CI; a failure or skip where the units are there.
    monkeypatch.setattr(optional_deps, "cpu_info", lambda: {"model": "Test CPU", "flags": flags})
    if switch is None:
        monkeypatch.delenv(SWITCH, raising=False)
    else:
        monkeypatch.setenv(SWITCH, switch)
    try:  # a skip must not escape: it would pass for this test's own skip
        bfloat16_units_or_skip()
        got, message = "run", ""
    except pytest.skip.Exception as err:
        got, message = "skip", str(err)
    except pytest.fail.Exception as err:
        got, message = "fail", str(err)
    assert got == outcome, message
    if outcome == "skip":
        assert message == "the CPU has no bfloat16 units (AVX512-BF16, AMX-BF16)"
    elif outcome == "fail":
        assert message == (f"{SWITCH}=1 (the CPU has bfloat16 units) but ppmoco.fast_path.cpu_info() finds none: "
                           f"model 'Test CPU', flags {flags}")


def ci_switch_line():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if SWITCH in line and not line.lstrip().startswith("#")]
    assert len(lines) == 1, f".ci/run sets {SWITCH} on one line, found {lines}"
    assert "/proc/cpuinfo" in lines[0]
    return lines[0]


@pytest.mark.parametrize("flags, expected", [
    ("fpu avx2 avx512f avx512_bf16 avx512_fp16", "1"), ("fpu avx2 amx_bf16 amx_tile", "1"),
    ("fpu avx2 avx512f avx512_vnni amx_tile", "unset"),
])
def test_ci_requires_bfloat16_where_proc_cpuinfo_lists_the_units(tmp_path, flags, expected):
    # .ci/run's line, run under the script's `set -euo pipefail` on a /proc/cpuinfo written here.
    # Catches: CI exporting another name than the tests read, grepping for other flags, or a line
    # that ends the script (set -e) on a CPU without the units.
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(processor(0, "Test CPU", flags))
    line = ci_switch_line().replace("/proc/cpuinfo", str(cpuinfo))
    script = f'set -euo pipefail\nunset {SWITCH}\n{line}\nbash -c \'echo "${{{SWITCH}:-unset}}"\'\n'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == f"{expected}\n", (line, done)
