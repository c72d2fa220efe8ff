"""The kept-indices record: what a worker writes is what the API server reads, bounded."""

import json

import pytest
import torch

from pio_fvlm_vllm.vllm_ext import kept_indices
from pio_fvlm_vllm.vllm_ext.kept_indices import KeptStore, add_to_body, image_key, requested


def test_keys_are_positive_int64_and_stable():
    h = "9f" * 32
    assert image_key(h) == int(h[:15], 16) == image_key(h) and 0 < image_key(h) < 2**63
    assert image_key("0" * 64) == 1 and image_key("not-hex") > 0


def test_store_round_trip_and_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(kept_indices, "CAPACITY", 5)
    monkeypatch.setattr(kept_indices, "_PRUNE_EVERY", 4)
    store = KeptStore(tmp_path)
    store.put(7, torch.tensor([1, 4, 9]), 576)
    assert store.get(7) == ([1, 4, 9], 576) and store.get(8) is None and store.get(0) is None
    for key in range(100, 112):
        store.put(key, torch.tensor([key]), 10)
    assert len(list(tmp_path.glob("*.json"))) <= 5 + 4 and store.get(111) == ([111], 10)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("body, stream, expected", [({}, False, False), ({"pio_fvlm_kept_indices": False}, False, False),
                                                    ({"pio_fvlm_kept_indices": None}, True, False),
                                                    ({"pio_fvlm_kept_indices": True}, False, True)])
def test_requested(body, stream, expected):
    assert requested(body, stream) is expected


@pytest.mark.parametrize("body, stream, message", [({"pio_fvlm_kept_indices": 1}, False, "must be true or false, got 1"),
                                                   ({"pio_fvlm_kept_indices": "yes"}, False, 'got "yes"'),
                                                   ({"pio_fvlm_kept_indices": True}, True, "stream false")])
def test_bad_requests_name_the_field(body, stream, message):
    with pytest.raises(ValueError, match="pio_fvlm_kept_indices") as info:
        requested(body, stream)
    assert message in str(info.value)


def test_field_is_added_to_json_bodies_only():
    body = json.dumps({"id": "x", "choices": []}).encode()
    assert json.loads(add_to_body(body, {"kept_indices": [[1]]}))["pio_fvlm"] == {"kept_indices": [[1]]}
    error = json.dumps({"error": {"message": "no"}}).encode()
    assert add_to_body(error, {"a": 1}) == error and add_to_body(b"<html>", {"a": 1}) == b"<html>"
