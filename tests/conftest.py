"""Shared fixtures: where the real datasets are, and tiny configs for end-to-end runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def no_data_root_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """$SLT_DATA set in the shell would move every test's default data root; tests that
    mean it set it themselves, and real data comes from the `shared_data` fixture."""
    monkeypatch.delenv("SLT_DATA", raising=False)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the repository; tests that need it skip when it is absent."""
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (MNIST/raw)")
    return SHARED_DATA


TINY = [
    "data.name=planted_teacher", "data.input_dim=8", "data.num_classes=3",
    "data.teacher_hidden=16", "data.train_size=256", "data.test_size=128",
    "model.name=mlp", "model.hidden=[16, 16]", "search.epochs=3", "search.batch_size=64",
    "search.ticket_density=0.25", "source.density=0.5", "run.progress=false",
]


@pytest.fixture
def tiny_overrides() -> list[str]:
    """Overrides of a run that takes well under a second on a CPU."""
    return list(TINY)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` run where torch sees a CUDA device and skip, saying so, elsewhere
    (`pytest -m cuda` selects exactly them: the GPU proof runs that)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
