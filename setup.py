"""Build script. Metadata lives in pyproject.toml; this file only exists for the compiled extension
(added with the CUDA kernels) so that `pip install .` keeps working with or without a CUDA toolkit."""
from setuptools import setup

setup()
