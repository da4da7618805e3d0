import numpy as np
import pytest

from conversions import convert
from task import make_instance


@pytest.fixture
def save(tmp_path):
    """Write a dict of arrays as an .npz submission and return its path."""
    def _save(weights: dict, name: str = "sub.npz"):
        path = tmp_path / name
        np.savez(path, **weights)
        return path
    return _save


def reference(level: int, seed: int) -> dict[str, np.ndarray]:
    inst = make_instance(level, seed)
    return convert(inst.files, inst.args, inst.config, optimizer=inst.optimizer)
