"""The wire protocol's rules: one union per inbox, strict decoding, no pickle."""

from __future__ import annotations

import pathlib
import typing

import msgspec
import pytest

from actors import protocol
from actors.protocol import INBOX_TYPES, Abort, GenerateRequest, StepTokens, TextDelta
from model_runner.sampling_params import SamplingParams


def tagged_structs() -> set[type]:
    return {
        obj
        for obj in vars(protocol).values()
        if isinstance(obj, type)
        and issubclass(obj, protocol._Message)
        and obj is not protocol._Message
    }


def test_every_message_belongs_to_exactly_one_inbox_union():
    members: dict[type, list[str]] = {}
    for inbox, union in INBOX_TYPES.items():
        for member in typing.get_args(union) or (union,):
            members.setdefault(member, []).append(inbox)
    assert set(members) == tagged_structs()
    for struct, inboxes in members.items():
        assert len(inboxes) == 1, f"{struct.__name__} is in {inboxes}"


def test_round_trip_through_its_inbox_decoder():
    msg = GenerateRequest(
        request_id="r1",
        prompt="hi",
        sampling=SamplingParams(temperature=0.5, stop=["x"], logit_bias={5: -1.0}),
        arrival_time=1.5,
    )
    decoder = msgspec.msgpack.Decoder(INBOX_TYPES["tokenizer"])
    assert decoder.decode(msgspec.msgpack.encode(msg)) == msg


def test_strict_decoding_rejects_foreign_and_malformed_messages():
    decoder = msgspec.msgpack.Decoder(INBOX_TYPES["scheduler"])
    foreign = msgspec.msgpack.encode(StepTokens(outputs=[]))  # a detokenizer message
    with pytest.raises(msgspec.ValidationError):
        decoder.decode(foreign)
    wrong_type = msgspec.msgpack.encode({"msg": "Abort", "request_id": 7})
    with pytest.raises(msgspec.ValidationError):
        decoder.decode(wrong_type)
    assert decoder.decode(msgspec.msgpack.encode(Abort(request_id="a"))) == Abort(request_id="a")


def test_hot_messages_are_array_like():
    encoded = msgspec.msgpack.encode(TextDelta("r", 0, "hi", [1, 2]))
    assert msgspec.msgpack.decode(encoded)[:4] == ["r", 0, "hi", [1, 2]]


def test_no_pickle_anywhere():
    root = pathlib.Path(__file__).resolve().parents[2]
    for room in ("kernels", "model_runner", "actors", "api"):
        for path in (root / room).rglob("*.py"):
            text = path.read_text()
            assert "import pickle" not in text and "cloudpickle" not in text, path


def test_transformers_does_not_take_our_kernels_for_the_hub_package():
    from transformers.utils.import_utils import is_kernels_available

    assert is_kernels_available() is False
