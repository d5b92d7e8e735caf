"""Atomic outputs: a crash while writing leaves the old files whole; aligned pairs appear together."""
import numpy as np
import pytest

from pipeline import io


def test_atomic_dir_swaps_the_whole_folder_or_nothing(tmp_path):
    target = tmp_path / "cache"
    with io.atomic_dir(target) as out:
        io.save_pair(out / "train", np.zeros((3, 2)), np.zeros(3, int))
        io.write_json(out / "meta.json", {"n": 3})
    assert io.load_pair(target / "train")[0].shape == (3, 2)

    with pytest.raises(RuntimeError, match="crash"):
        with io.atomic_dir(target) as out:
            io.save_pair(out / "train", np.ones((5, 2)), np.ones(5, int))  # the new x and y are written ...
            raise RuntimeError("crash")  # ... but the stage dies before the folder is complete
    x, y = io.load_pair(target / "train")
    assert x.shape == (3, 2) and y.shape == (3,) and io.read_json(target / "meta.json") == {"n": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no temporary folder left behind

    with io.atomic_dir(target) as out:
        io.save_pair(out / "train", np.ones((5, 2)), np.ones(5, int))
    assert io.load_pair(target / "train")[0].shape == (5, 2)
    assert not (target / "meta.json").exists()  # the old folder's files do not linger beside the new ones


def test_a_misaligned_pair_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="misaligned"):
        io.save_pair(tmp_path / "train", np.zeros((3, 2)), np.zeros(4))
    assert list(tmp_path.iterdir()) == []
