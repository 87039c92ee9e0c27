"""Python launchers of the compiled CUDA kernels (vitslim_kernels._C), one module per op; they import nothing from
ops/. The op that calls a launcher is defined in ops/<op>.py; the extension itself loads on the first launch.
"""
