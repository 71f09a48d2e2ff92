"""Testing tools that ship with fastbp: the CUDA emulator (``cuda_emulator``) and the emulated CuPy
module (``fake_cupy``) that runs the cupy backend's own code on the CPU."""
