import os

# A kernel that fails must fail its test, not fall back to the reference and pass (dispatch.fail_safe).
os.environ.setdefault("VITSLIM_STRICT_KERNELS", "1")
# Latency tables a test measures go to a folder of this run, never the user's ~/.cache/vitslim.
if "VITSLIM_CACHE" not in os.environ:
    import tempfile
    os.environ["VITSLIM_CACHE"] = tempfile.mkdtemp(prefix="vitslim-test-cache-")

import pytest

from .tiny_models import VARIANTS


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    """(timm name, overrides) of each supported ViT family, tiny."""
    return VARIANTS[request.param]



def _stack() -> str:
    import platform

    import numpy
    import timm
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return (f"vitslim test stack: python {platform.python_version()}, torch {torch.__version__}, "
            f"triton {triton_version}, timm {timm.__version__}, numpy {numpy.__version__}")


def pytest_sessionstart(session):
    """Print the versions this run tests, -q included, so a CI log says what it proved."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(_stack())
