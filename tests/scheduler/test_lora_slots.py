"""Adapter slots in the scheduler: at most --max-loras adapters in a step, LRU among idle
slots, a request waiting for a slot lets the others pass, refills travel in the step, and
prefix-cache keys carry the adapter's load generation."""

from __future__ import annotations

import msgspec
import pytest

from actors.scheduler.errors import AdmissionError
from actors.scheduler.lora_slots import LoraRegistry
from model_runner.step_input import LoraLoad, lora_key
from tests.scheduler.fake_runner import Driver, make_scheduler, request

MODULES = (("a", "/a"), ("b", "/b"), ("c", "/c"))


def lora_request(rid: str, prompt: list[int], name: str | None, **sampling):
    return msgspec.structs.replace(request(rid, prompt, **sampling), lora_name=name)


def test_the_registry_picks_resident_then_free_then_the_least_recently_used_idle_slot():
    reg = LoraRegistry(2, MODULES)
    ka, kb, kc = (reg.lookup(n)[0] for n in "abc")
    assert reg.pick(ka, set()) == 0
    reg.assign(0, ka, "/a")
    assert reg.pick(ka, set()) == 0 and reg.pick(kb, {ka}) == 1
    reg.assign(1, kb, "/b")
    assert reg.take_loads() == [LoraLoad(slot=0, key=ka, path="/a"),
                                LoraLoad(slot=1, key=kb, path="/b")]  # fmt: skip
    assert reg.pick(kc, {ka, kb}) is None  # NOTE: both in use: wait
    reg.assign(0, ka, "/a")  # a used again: b is now the least recently used
    assert reg.pick(kc, set()) == 1
    assert reg.take_loads() == []  # a was resident: nothing to send
    reg.resend_loads()
    assert [x.slot for x in reg.take_loads()] == [0, 1]


def test_a_reloaded_adapter_gets_a_new_key():
    reg = LoraRegistry(2, MODULES)
    assert reg.lookup("a")[0] == lora_key("a", 0)
    assert reg.unregister("a") and reg.lookup("a") is None and not reg.unregister("a")
    key = reg.next_key("a")
    reg.register("a", key, "/a2")
    assert reg.lookup("a") == (key, "/a2") and key != lora_key("a", 0)


def test_steps_hold_at_most_max_loras_adapters_and_a_waiting_one_lets_others_pass():
    sched = make_scheduler(num_blocks=32, enable_lora=True, max_loras=2, lora_modules=MODULES)
    d = Driver(sched)
    for rid, name in (("r1", "a"), ("r2", "b"), ("r3", "c"), ("r4", None), ("r5", "a")):
        sched.add_request(lora_request(rid, [1, 2, 3], name, max_tokens=3, ignore_eos=True))
    step, _ = d.step()
    slots = {s.seq_id: s.lora_slot for s in step.new_sequences}
    assert slots == {"r1": 0, "r2": 1, "r4": -1, "r5": 0}  # r3 (c) waits for a slot
    assert [x.slot for x in step.lora_loads] == [0, 1]
    seen = [step]
    while (out := d.step()) is not None:
        seen.append(out[0])
    later = [s for step in seen[1:] for s in step.new_sequences]
    assert [s.seq_id for s in later] == ["r3"] and later[0].lora_slot in (0, 1)
    for step in seen:
        keys = {s.lora_slot for s in step.new_sequences if s.lora_slot >= 0}
        assert len(keys) <= 2
    assert sched.stats().num_blocks_in_use == 0


def test_prefix_blocks_are_keyed_by_adapter_and_generation():
    sched = make_scheduler(num_blocks=32, enable_lora=True, max_loras=2, lora_modules=MODULES)
    d = Driver(sched)
    prompt = list(range(1, 13))  # three full blocks of 4

    def cached(rid: str, name: str | None) -> int:
        sched.add_request(lora_request(rid, prompt, name, max_tokens=1))
        step, _ = d.step()
        while d.step() is not None:
            pass
        return step.new_sequences[0].num_computed_tokens

    assert cached("x1", "a") == 0
    assert cached("x2", "a") == 8  # NOTE: the last prompt token is always computed
    assert cached("x3", "b") == 0 and cached("x4", None) == 0
    reg = sched.loras
    reg.unregister("a")
    reg.register("a", reg.next_key("a"), "/a")
    assert cached("x5", "a") == 0


def test_an_unknown_adapter_is_a_404():
    sched = make_scheduler(enable_lora=True, max_loras=2, lora_modules=MODULES)
    with pytest.raises(AdmissionError) as err:
        sched.add_request(lora_request("r", [1, 2], "nope"))
    assert err.value.status == 404 and err.value.param == "model"
