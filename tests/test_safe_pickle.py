"""The plain-data unpickler: published pickles load, crafted ones never run."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from crossgap_fast.errors import UnsafePickleError
from crossgap_fast.safe_pickle import load_plain_pickle, loads_plain_pickle


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


PLAIN = {
    "imlist": ["all_souls_000013", "oxford_001"],
    "gnd": [{"bbx": [1.5, 2.0, 30.0, 40.0], "easy": np.array([0, 3]), "hard": [1], "junk": []}],
    "misc": (1, 2.5, None, True, b"raw", {3, 4}),
    "scalar": np.float64(0.25),
    "names": np.array(["a", "bb"]),
}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_loads_at_every_protocol(protocol):
    out = loads_plain_pickle(pickle.dumps(PLAIN, protocol=protocol))
    assert out["imlist"] == PLAIN["imlist"]
    np.testing.assert_array_equal(out["gnd"][0]["easy"], [0, 3])
    assert out["gnd"][0]["bbx"] == [1.5, 2.0, 30.0, 40.0]
    assert out["misc"] == PLAIN["misc"]
    assert out["scalar"] == 0.25
    assert list(out["names"]) == ["a", "bb"]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_crafted_pickle_never_runs(tmp_path, protocol):
    marker = tmp_path / "ran"
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps({"gnd": [_RunsCode(str(marker))]}, protocol=protocol))
    with pytest.raises(UnsafePickleError, match=r"gnd_roxford5k\.pkl: refused.*posix\.system|gnd_roxford5k\.pkl: refused.*os\.system"):
        load_plain_pickle(path)
    assert not marker.exists()


def test_object_arrays_are_refused(tmp_path):
    with pytest.raises(UnsafePickleError, match="array of Python objects"):
        loads_plain_pickle(pickle.dumps(np.array([1, "a"], dtype=object)))


def test_garbage_is_one_clear_error():
    with pytest.raises(UnsafePickleError, match=r"^x\.pkl: not a readable pickle"):
        loads_plain_pickle(b"not a pickle at all", "x.pkl")


def test_sklearn_bunch_reads_as_a_dict():
    sklearn = pytest.importorskip("sklearn.utils")
    bunch = sklearn.Bunch(data=["doc one", "doc two"], target=np.array([1, 0]), target_names=["a", "b"])
    out = loads_plain_pickle(pickle.dumps({"test": bunch}))
    assert isinstance(out["test"], dict)
    assert out["test"]["data"] == ["doc one", "doc two"]
    np.testing.assert_array_equal(out["test"]["target"], [1, 0])
