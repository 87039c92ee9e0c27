"""Python launchers of the compiled CUDA kernels (vitslim_kernels._C), one module per op.

Importing a launcher registers its torch.library custom op; the extension itself loads on first call.
"""
