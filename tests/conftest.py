import pytest

from .tiny_models import VARIANTS


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    """(timm name, overrides) of each supported ViT family, tiny."""
    return VARIANTS[request.param]
