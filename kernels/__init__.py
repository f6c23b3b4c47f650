"""Device code: Triton ``@jit`` kernels (``*.py``) and CUDA C sources for CuPy (``*.cu``).

Installed as ``clisonix_gpu.kernels``. Nothing here imports the host package.
"""
