"""Build the CAPNet fused-op extension `capnet_ext` (csrc/).

    python setup.py build_ext --inplace          # capnet_ext*.so next to capnet.py
    pip install --no-build-isolation -e .

CPU kernels are always built. CUDA kernels are added when torch was built with CUDA and
either a GPU is visible or FORCE_CUDA=1 (e.g. building on a GPU-less node); TORCH_CUDA_ARCH_LIST
picks the architectures (torch reads it). FORCE_CUDA=1 with a CPU-only torch is an error.
"""
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit("setup.py: PyTorch must be installed first (pip install torch), then rerun; "
             "use `pip install --no-build-isolation -e .` so the build sees it")

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
torch_has_cuda = torch.version.cuda is not None
if force_cuda and not torch_has_cuda:
    sys.exit(f"setup.py: FORCE_CUDA=1 but this torch ({torch.__version__}) has no CUDA support")
if force_cuda and CUDA_HOME is None:
    sys.exit("setup.py: FORCE_CUDA=1 but no CUDA toolkit found; set CUDA_HOME to the folder holding bin/nvcc")
with_cuda = torch_has_cuda and CUDA_HOME is not None and (force_cuda or torch.cuda.is_available())

# -O3 and OpenMP as torch itself is built: at::parallel_for is inlined from ATen's headers and
# runs serially unless this file is compiled with OpenMP.
openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
cxx_flags = ["-O3"] + openmp   # the C++ standard: torch adds the one its headers need
sources = [os.path.join(CSRC, "capnet_ops.cpp")]
if with_cuda:
    sources += [os.path.join(CSRC, "capnet_cuda.cpp"), os.path.join(CSRC, "capnet_kernels.cu")]
    ext = CUDAExtension(
        "capnet_ext", sources,
        define_macros=[("CAPNET_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        extra_link_args=openmp,
    )
    what = (f"CPU + CUDA kernels (CUDA {torch.version.cuda}, toolkit {CUDA_HOME}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<torch default: visible GPUs>')})")
else:
    ext = CppExtension("capnet_ext", sources, extra_compile_args={"cxx": cxx_flags},
                       extra_link_args=openmp)
    why = ("torch has no CUDA" if not torch_has_cuda else
           "no CUDA toolkit found" if CUDA_HOME is None else "no GPU visible; set FORCE_CUDA=1 to build CUDA anyway")
    what = f"CPU kernels only ({why})"
print(f"capnet_ext: building {what} against torch {torch.__version__}", flush=True)

setup(
    name="capnet",
    version="0.1.0",
    description="CAPNet: correlation adaptation prompt network (reference implementation)",
    py_modules=["capnet", "data_prep"],
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
)
