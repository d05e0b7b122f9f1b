"""Which names a consumer serves, from its backend's ``/v1/models`` (no service needed)."""

from __future__ import annotations

import random

from consumer.served_names import cards_from, share
from simulator.served import ServedModels, parse_lora_modules, split_names

VLLM_LIST = [
    {"id": "llama", "root": "meta/llama", "parent": None, "max_model_len": 8192, "permission": []},
    {"id": "llama-3-8b", "root": "meta/llama", "parent": None, "max_model_len": 8192, "permission": []},
    {"id": "course-a", "root": "/adapters/a", "parent": "llama", "max_model_len": None, "permission": []},
]


def test_every_listed_name_is_served_primary_first_with_parent_and_root() -> None:
    cards = cards_from(VLLM_LIST, "llama")
    assert list(cards) == ["llama", "llama-3-8b", "course-a"]
    assert cards["course-a"] == {
        "id": "course-a",
        "root": "/adapters/a",
        "parent": "llama",
        "max_model_len": None,
    }
    assert "permission" not in cards["llama"]


def test_the_primary_comes_first_wherever_the_backend_lists_it() -> None:
    assert next(iter(cards_from(VLLM_LIST, "llama-3-8b"))) == "llama-3-8b"


def test_a_backend_that_does_not_list_the_primary_serves_only_it() -> None:
    cards = cards_from(VLLM_LIST, "other")
    assert list(cards) == ["other"] and cards["other"]["root"] == "meta/llama"
    assert cards_from([], "other") == {"other": {"id": "other"}}


def test_discovery_can_be_turned_off_and_unservable_names_are_skipped() -> None:
    assert list(cards_from(VLLM_LIST, "llama", discover=False)) == ["llama"]
    odd = [*VLLM_LIST, {"id": "bad\tname"}, {"id": "x" * 300}, {"id": 3}, "junk"]
    assert list(cards_from(odd, "llama")) == ["llama", "llama-3-8b", "course-a"]


def test_the_simulator_lists_like_vllm() -> None:
    assert split_names("a, b  c") == ["a", "b", "c"]
    assert parse_lora_modules("x=/p/x y") == {"x": "/p/x", "y": "y"}
    served = ServedModels(["m", "alias"], "org/m", 64, {"x": "/p/x"})
    listing = served.listing()["data"]
    assert [(c["id"], c["root"], c["parent"], c["max_model_len"]) for c in listing] == [
        ("m", "org/m", None, 64),
        ("alias", "org/m", None, 64),
        ("x", "/p/x", "m", None),
    ]
    # vLLM answers under the adapter's name, but under the first name for an alias.
    assert served.check("x") == "x" and served.check(None) == served.check("alias") == "m"
    served.unload("x")
    assert [c["id"] for c in served.listing()["data"]] == ["m", "alias"]


def test_the_window_goes_to_the_names_whose_requests_wait_and_never_beyond_it() -> None:
    # One name holds all four slots with more waiting; a request waits for another: it gets a share.
    assert share(4, {"a": 4, "b": 0}, {"a": 10, "b": 1}) == {"a": 3, "b": 1}
    # Nothing waits: each name keeps a ready slot, the primary first.
    assert share(3, {"a": 0, "b": 0}, {}) == {"a": 2, "b": 1}
    # A window smaller than the names: the one slot goes where a request waits.
    assert share(1, {"a": 0, "b": 0, "c": 0}, {"c": 2}) == {"a": 0, "b": 0, "c": 1}
    # Fewer slots than names in demand: they take turns, whoever holds none first.
    assert share(1, {"a": 1, "c": 0}, {"a": 5, "c": 5}) == {"a": 0, "c": 1}
    for window in range(6):
        assert sum(share(window, {"a": 3, "b": 2, "c": 0}, {"a": 5, "c": 1}).values()) == window
    assert share(0, {"a": 2}, {"a": 3}) == {"a": 0}


def one_slot_at_a_time(window: int, holding: dict[str, int], waiting: dict[str, int]) -> dict[str, int]:
    """The sharing rule stated slot by slot (rounds of one slot per name, in order): what ``share``
    computes in whole rounds."""
    targets = dict.fromkeys(holding, 0)
    left = window
    while left > 0:
        wanting = sorted(
            (n for n in targets if targets[n] < holding[n] + waiting.get(n, 0)), key=lambda n: holding[n]
        )
        for name in wanting or list(targets):
            if left == 0:
                break
            targets[name] += 1
            left -= 1
    return targets


def test_sharing_in_whole_rounds_gives_what_sharing_slot_by_slot_gives() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        names = [f"n{i}" for i in range(rng.randint(1, 5))]
        holding = {n: rng.randint(0, 6) for n in names}
        waiting = {n: rng.randint(0, 8) for n in names if rng.random() < 0.7}
        window = rng.randint(0, 40)
        assert share(window, holding, waiting) == one_slot_at_a_time(window, holding, waiting), (
            window,
            holding,
            waiting,
        )
