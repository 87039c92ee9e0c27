"""The @triton.jit kernels of vitslim_kernels and their launchers, one module per op; they import nothing from ops/.

Nothing imports this package at `import vitslim_kernels`: an op (ops/<op>.py) imports its module here the first
time it launches a kernel, so a machine without Triton (or without a GPU) imports the library fine.
"""
