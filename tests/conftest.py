import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M (converted once into ~/.cache/qbara), loaded once per session."""
    from qbara.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def smollm2_fresh(smollm2):
    """A private copy of SmolLM2 that a test may quantize or train."""
    model, tokenizer = smollm2
    return copy.deepcopy(model), tokenizer
