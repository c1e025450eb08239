import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hf_fixtures import save_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """name -> (directory with the saved HF model, the PyTorch model), built once per session."""
    cache = {}

    def get(name: str):
        if name not in cache:
            path = tmp_path_factory.mktemp(name)
            cache[name] = (path, save_hf_model(name, path))
        return cache[name]

    return get
