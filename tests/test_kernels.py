"""The CUDA sources compile, every instantiation of them, for sm_90 with nvcc (no GPU needed).

Skipped where nvcc is absent, unless FASTBP_REQUIRE_NVCC=1 (as CI sets it), where that fails instead.
"""

import os
import re
import shutil
import subprocess

import pytest

from fastbp.activations import CODES
from fastbp.backends import cuda_sources
from fastbp.losses import LOSS_CODES, TARGET_KINDS

NVCC = shutil.which("nvcc")


def _nvcc_or_skip():
    if NVCC is None:
        if os.environ.get("FASTBP_REQUIRE_NVCC") == "1":
            pytest.fail("FASTBP_REQUIRE_NVCC=1 but nvcc is not on the PATH")
        pytest.skip("nvcc is not on the PATH: the CUDA compile check is skipped")
    return NVCC


def test_sources_are_found_and_every_file_has_instantiations():
    folder = cuda_sources.kernel_dir()
    for file in cuda_sources.FILES:
        assert (folder / file).is_file()
        names = cuda_sources.name_expressions(file)
        assert names and len(set(names)) == len(names)
        text = (folder / file).read_text()
        for base in {n.split("<")[0] for n in names}:
            assert re.search(rf"__global__ void {base}\(", text), f"{base} is not a kernel of {file}"


@pytest.mark.parametrize("file", cuda_sources.FILES)
def test_every_instantiation_compiles_for_sm_90(tmp_path, file):
    nvcc = _nvcc_or_skip()
    unit = tmp_path / f"all_{file}"
    unit.write_text(cuda_sources.instantiation_unit(file))
    cubin = tmp_path / f"{file}.cubin"
    result = subprocess.run(
        [nvcc, "-std=c++17", "-arch=sm_90", "-cubin", "-Werror", "all-warnings", "-o", str(cubin), str(unit)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # every instantiation is in the binary (as its mangled symbol's base name)
    symbols = cubin.read_bytes()
    for name in cuda_sources.name_expressions(file):
        assert name.split("<")[0].encode() in symbols


def test_the_cupy_backend_only_launches_listed_kernels():
    """Each kernel the backend asks CuPy for by name is in the instantiation list (compiled above)."""
    source = (cuda_sources.kernel_dir().parent / "fastbp" / "backends" / "cupy_backend.py")
    if not source.is_file():
        import fastbp.backends.cupy_backend as cb

        source = cb.__file__
    text = open(source).read()
    used = set(re.findall(r'_launch\(\s*"(\w+\.cu)", "([\w<>, {}]+)"', text))
    assert used, "no kernel launches found"
    listed = {(f, n) for f in cuda_sources.FILES for n in cuda_sources.name_expressions(f)}
    # {ACT} is the loss variant or the targets' kind there, an activation code elsewhere
    variants = {"pointwise_loss": [LOSS_CODES[loss] for loss in cuda_sources.POINTWISE_LOSSES],
                "check_batch": range(len(TARGET_KINDS)), "check_batch_finish": range(len(TARGET_KINDS))}
    for file, template in used:
        base = template.split("<")[0]
        if "{G}" in template:  # an update: float32 or float64 throughout, or float32 from a 16-bit gradient
            pairs = [(c, c) for c in ("float", "double")] + [("float", c) for c in ("bf16", "f16")]
        else:  # the reductions of accumulators run in float32 and float64 alone, loss scaling in 16 bits
            only = {"reduce_loss": ("float", "double"), "ordered_sum": ("float", "double"),
                    "nonfinite_guard": ("float", "double"), "scale_by": ("bf16", "f16"),
                    "loss_scale_update": ("float",), "mlp_fused_pass": ("float", "double", "bf16")}
            pairs = [(c, c) for c in cuda_sources.DTYPES.values() if c in only.get(base, (c,))]
        for ctype, gtype in pairs:
            codes = variants.get(base, sorted(CODES.values())) if "{ACT}" in template else [0]
            for code in codes:
                name = template.replace("{T}", ctype).replace("{G}", gtype).replace("{ACT}", str(code))
                assert (file, name) in listed, name


def test_the_source_cupy_compiles_is_self_contained_so_header_edits_reach_its_cache(tmp_path):
    """CuPy's disk cache keys on the source text, not on the files it includes: the backend hands it each
    file with its headers inlined, so editing common.cuh alone changes what CuPy hashes."""
    import shutil

    folder = tmp_path / "kernels"
    shutil.copytree(cuda_sources.kernel_dir(), folder)
    for file in cuda_sources.FILES:
        text = cuda_sources.source(file, folder)
        assert '#include "' not in text and "block_sum" in text  # common.cuh is in it
    before = cuda_sources.source("dense.cu", folder)
    header = folder / "common.cuh"
    header.write_text(header.read_text().replace("T(0.01) * z", "T(0.02) * z"))
    after = cuda_sources.source("dense.cu", folder)
    assert after != before and "T(0.02) * z" in after


def test_the_headers_default_block_sizes_are_the_python_ones():
    """common.cuh's fallback definitions (for compiling a file alone) equal cuda_sources' constants, which
    every source handed to CuPy defines ahead of them."""
    header = (cuda_sources.kernel_dir() / "common.cuh").read_text()
    assert f"#define FASTBP_THREADS {cuda_sources.THREADS}\n" in header
    assert f"#define FASTBP_REDUCE_THREADS {cuda_sources.REDUCE_THREADS}\n" in header
    assert cuda_sources.source("optim.cu").startswith(cuda_sources.defines())



def test_the_codes_header_is_the_python_tables():
    """kernels/codes.cuh is generated from the Python tables (activation codes and what g' reads, loss codes,
    target kinds): a change to them without regenerating it (cuda_sources.write_codes_header()) fails here,
    instead of computing wrong gradients on a GPU alone."""
    path = cuda_sources.kernel_dir() / cuda_sources.CODES_HEADER
    assert path.read_text() == cuda_sources.codes_header(), (
        "kernels/codes.cuh is stale: run python -c 'from fastbp.backends import cuda_sources; "
        "cuda_sources.write_codes_header()'")
