import itertools
import re
import time

from state_manager.domain.fingerprint import canonical_json, fingerprint
from state_manager.domain.ids import is_object_id, new_object_id


def test_object_id_shape() -> None:
    assert re.fullmatch(r"[0-9a-f]{24}", new_object_id())


def test_object_id_embeds_current_time() -> None:
    before = int(time.time())
    seconds = int(new_object_id()[:8], 16)
    assert before <= seconds <= int(time.time())


def test_object_ids_are_unique_and_count_up() -> None:
    ids = [new_object_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert len({i[8:18] for i in ids}) == 1  # process part is fixed
    counters = [int(i[18:], 16) for i in ids]
    steps = {(b - a) % (1 << 24) for a, b in itertools.pairwise(counters)}
    assert steps == {1}


def test_is_object_id() -> None:
    assert is_object_id(new_object_id())
    assert is_object_id("507F1F77BCF86CD799439011")
    assert not is_object_id("507f1f77bcf86cd79943901")
    assert not is_object_id("507f1f77bcf86cd7994390111")
    assert not is_object_id("507f1f77bcf86cd79943901g")
    assert not is_object_id("")


def test_fingerprint_is_independent_of_key_order() -> None:
    a = {"b": 1, "a": {"y": "2", "x": "1"}}
    b = {"a": {"x": "1", "y": "2"}, "b": 1}
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint({**a, "b": 2})


def test_canonical_json_format() -> None:
    assert canonical_json({"z": "é", "a": [1, {"d": 0, "c": None}]}) == (
        '{"a":[1,{"c":null,"d":0}],"z":"\\u00e9"}'
    )


def test_fingerprint_known_value() -> None:
    # SHA-256 of the ASCII text {"a":"1"}
    expected = "9afeb0f2b203f254312ec8ded441d0318b7c34c57f8695ede42d2215a30c0960"
    assert fingerprint({"a": "1"}) == expected
