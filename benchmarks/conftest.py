from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU")
    here = str(Path(__file__).parent)
    for item in items:
        if str(item.fspath).startswith(here):  # only this folder's benchmarks, not tests collected beside them
            item.add_marker(skip)
