"""The @triton.jit kernels of vitslim_kernels, one module per op.

Nothing imports this package at `import vitslim_kernels`: dispatch loads a module here the first time an op
runs its Triton implementation, so a machine without Triton (or without a GPU) imports the library fine.
"""
