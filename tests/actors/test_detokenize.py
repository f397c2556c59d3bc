"""IncrementalDetokenizer: UTF-8-safe deltas equal to a full decode; stop strings never leak."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, trainers

from actors.detokenize import IncrementalDetokenizer, token_texts

TEXTS = [
    "Hello world! How are you today?",
    "  leading spaces, trailing spaces  ",
    "Café, naïve, résumé, Ångström, São Paulo, Zürich, Łódź.",
    "日本語のテキストと中文文本，還有한국어 문장.",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 and ✨ sparkles ✨",
    "Mixed: def f(x):\n    return x ** 2  # ∑ ∫ √ π ≈ 3.14159\n",
    "Русский текст, ελληνικά, עברית, العربية, हिन्दी",
    "Tabs\tand\nnewlines\r\n\n\nand  double  spaces",
    "Combining: e\u0301 a\u0308 n\u0303; zero width\u200bjoiner",
    "Math 𝔸𝔹ℂ 𝟘𝟙𝟚 and rare CJK 𠀀𠀁 𪚥",
]
CHAR_POOL = "aAzZ09 .,!?\n\téèüßçñ日本語中文한국😀🎉👍🏽🇫🇷✨∑π𝔸—«»"


def stream(decoder: IncrementalDetokenizer, ids: list[int], sizes: list[int] | None = None):
    """Feed `ids` in chunks (sizes cycle; default one token at a time); return the deltas."""
    sizes = sizes or [1]
    deltas, i, k = [], 0, 0
    while i < len(ids) and not decoder.done:
        n = sizes[k % len(sizes)]
        text, _ = decoder.add(ids[i : i + n])
        deltas.append(text)
        i, k = i + n, k + 1
    deltas.append(decoder.finish())
    return deltas


def whole(decoded: str) -> str:
    """A full decode less the U+FFFD of a last character the ids never completed: what the
    deltas add up to (the flush drops incomplete bytes)."""
    return decoded.rstrip("\ufffd")


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(CHAR_POOL) for _ in range(n))


@pytest.fixture(scope="module")
def tok(hf_tokenizer):
    return hf_tokenizer


def build_sentencepiece_like() -> Tokenizer:
    """A tiny Llama-2-style tokenizer: Metaspace normalizer, byte fallback, Strip decoder."""
    tk = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )  # fmt: skip
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    # NOTE: an ASCII-only corpus, so every other character falls back to byte tokens.
    corpus = ["Hello world, the quick brown fox jumps over the lazy dog: 0123456789."] * 10
    tk.train_from_iterator(corpus, trainer)
    spec = json.loads(tk.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["unk_token"] = "<unk>"
    return Tokenizer.from_str(json.dumps(spec))


@pytest.fixture(scope="module")
def sp_tok() -> Tokenizer:
    return build_sentencepiece_like()


def test_fixture_tokenizers_split_characters_across_tokens(tok, sp_tok):
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1 and tok.decode(ids[:1]).endswith("\ufffd")
    sp_ids = sp_tok.encode("😀").ids
    assert [sp_tok.id_to_token(i) for i in sp_ids][-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("sizes", [[1], [3], [1, 2, 5]])
def test_real_texts_roundtrip_without_replacement_chars(tok, skip, sizes):
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        deltas = stream(IncrementalDetokenizer(tok, skip_special_tokens=skip), ids, sizes)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip) == text
        assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("skip", [True, False])
def test_random_texts_with_special_tokens_roundtrip(tok, skip):
    rng = random.Random(1234)
    specials = tok.all_special_ids
    for _ in range(150):
        ids = tok.encode(random_text(rng, rng.randrange(1, 60)), add_special_tokens=False)
        for _ in range(rng.randrange(3)):
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        sizes = [rng.randrange(1, 4) for _ in range(3)]
        deltas = stream(IncrementalDetokenizer(tok, skip_special_tokens=skip), ids, sizes)
        full = tok.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) == whole(full)
        # NOTE: a special token inside a split character really yields U+FFFD (unskipped)
        assert "\ufffd" in full or not any("\ufffd" in d for d in deltas)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_arbitrary_token_ids_roundtrip(tok, data):
    """Even garbage ids (invalid UTF-8) concatenate to exactly the full decode."""
    ids = data.draw(st.lists(st.integers(0, len(tok) - 1), min_size=1, max_size=40))
    sizes = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    skip = data.draw(st.booleans())
    deltas = stream(IncrementalDetokenizer(tok, skip_special_tokens=skip), ids, sizes)
    assert "".join(deltas) == whole(tok.decode(ids, skip_special_tokens=skip))
    assert not any(d.endswith("\ufffd") for d in deltas[:-1] if d) or "\ufffd" in tok.decode(ids)


@pytest.mark.parametrize("skip", [True, False])
def test_sentencepiece_leading_spaces_and_byte_fallback(sp_tok, skip):
    rng = random.Random(7)
    texts = TEXTS + [random_text(rng, 40) for _ in range(100)]
    for text in texts:
        ids = sp_tok.encode(text).ids
        if rng.random() < 0.5:
            # NOTE: between whole characters: a special token inside a byte-fallback run makes
            # the run invalid UTF-8, which a full decode turns into U+FFFD retroactively
            cut = rng.randrange(len(text) + 1)
            ids = sp_tok.encode(text[:cut]).ids + [sp_tok.token_to_id("</s>")]
            ids += sp_tok.encode(text[cut:]).ids
        deltas = stream(IncrementalDetokenizer(sp_tok, skip_special_tokens=skip), ids, [1, 2])
        assert "".join(deltas) == whole(sp_tok.decode(ids, skip_special_tokens=skip))
        assert not any("\ufffd" in d for d in deltas)


def test_sentencepiece_space_after_first_token_is_kept(sp_tok):
    ids = sp_tok.encode("Hello world the fox").ids
    deltas = stream(IncrementalDetokenizer(sp_tok), ids)
    assert "".join(deltas) == "Hello world the fox"
    assert any(d.startswith(" ") for d in deltas[1:])


def test_prompt_context_keeps_the_first_tokens_leading_space(tok, sp_tok):
    prompt = sp_tok.encode("The quick brown").ids
    out = sp_tok.encode("fox jumps").ids  # NOTE: the normalizer prepends the space
    full = sp_tok.decode(prompt + out)
    deltas = stream(IncrementalDetokenizer(sp_tok, prompt_token_ids=prompt), out)
    assert "".join(deltas) == full[len(sp_tok.decode(prompt)) :] == " fox jumps"
    prompt = tok.encode("<|im_start|>assistant\n")
    out = tok.encode("Bonjour, ça va ? 😀", add_special_tokens=False)
    deltas = stream(IncrementalDetokenizer(tok, prompt_token_ids=prompt), out)
    assert "".join(deltas) == "Bonjour, ça va ? 😀"


def test_decoding_window_stays_small(tok):
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 300)
    decoder = IncrementalDetokenizer(tok)
    text = "".join(decoder.add([i])[0] for i in ids) + decoder.finish()
    assert text == tok.decode(ids)
    assert len(decoder._ids) < 80  # NOTE: never the whole sequence


def ids_and_pieces(tok, text: str) -> tuple[list[int], list[str]]:
    ids = tok.encode(text, add_special_tokens=False)
    return ids, [tok.decode([i]) for i in ids]


def test_stop_string_split_across_tokens_never_leaks(tok):
    text = "The answer is forty-two, said the computer."
    stop = "forty-two"
    ids, pieces = ids_and_pieces(tok, text)
    assert not any(stop in p for p in pieces)  # NOTE: the stop spans several tokens
    decoder = IncrementalDetokenizer(tok, stop=[stop])
    out, hit_at = [], None
    for k, i in enumerate(ids):
        delta, stopped = decoder.add([i])
        out.append(delta)
        assert not any(part in "".join(out) for part in ("forty", "-two"))
        if stopped:
            hit_at = k
            assert stopped == stop
            break
    assert "".join(pieces[: hit_at + 1]).endswith("two")
    assert "".join(out) == "The answer is "
    assert decoder.add(ids[hit_at + 1 :]) == ("", None)
    assert decoder.finish() == ""


def test_text_held_for_a_possible_stop_is_released(tok):
    text = "count: one two three four"
    ids, _ = ids_and_pieces(tok, text)
    decoder = IncrementalDetokenizer(tok, stop=["two threes", "fourteen"])
    deltas = stream(decoder, ids)
    assert "".join(deltas) == text and decoder.stopped_on is None
    held = [d for d in deltas[:-1]]
    assert "".join(held) == "count: one two three "  # " four" could still become "fourteen"
    assert deltas[-1] == "four"


def test_multiple_stop_strings_first_in_text_wins(tok):
    ids, _ = ids_and_pieces(tok, "alpha beta gamma delta")
    for stops in (["delta", "beta"], ["beta", "delta"], ["gamma", "a b"]):
        decoder = IncrementalDetokenizer(tok, stop=stops)
        text = "".join(stream(decoder, ids))
        first = min(stops, key=lambda s: "alpha beta gamma delta".index(s))
        assert decoder.stopped_on == first
        assert text == "alpha beta gamma delta"[: "alpha beta gamma delta".index(first)]


@pytest.mark.parametrize("sizes", [[1], [2], [100]])
def test_include_stop_str_in_output_truncates_after_it(tok, sizes):
    text = "Step 1: mix. Step 2: bake. END of recipe. More text."
    ids, _ = ids_and_pieces(tok, text)
    decoder = IncrementalDetokenizer(tok, stop=["END of", "zzz"], include_stop_str_in_output=True)
    assert "".join(stream(decoder, ids, sizes)) == "Step 1: mix. Step 2: bake. END of"
    assert decoder.stopped_on == "END of"
    decoder = IncrementalDetokenizer(tok, stop=["END of"])
    assert "".join(stream(decoder, ids, sizes)) == "Step 1: mix. Step 2: bake. "


def test_text_after_stop_in_the_same_token_is_dropped(tok):
    ids, pieces = ids_and_pieces(tok, "Hello world")
    assert pieces == ["Hello", " world"]
    decoder = IncrementalDetokenizer(tok, stop=["wor"])
    assert decoder.add(ids[:1]) == ("Hello", None)
    assert decoder.add(ids[1:]) == (" ", "wor")
    decoder = IncrementalDetokenizer(tok, stop=["wor"], include_stop_str_in_output=True)
    assert "".join(stream(decoder, ids)) == "Hello wor"


@pytest.mark.parametrize("include", [False, True])
def test_stop_at_the_very_first_token(tok, include):
    ids, pieces = ids_and_pieces(tok, "Hello there")
    decoder = IncrementalDetokenizer(tok, stop=["Hello"], include_stop_str_in_output=include)
    assert decoder.add(ids[:1]) == ("Hello" if include else "", "Hello")
    assert decoder.done and decoder.add(ids[1:]) == ("", None) and decoder.finish() == ""


def test_stop_string_made_of_a_split_multibyte_character(tok):
    ids, pieces = ids_and_pieces(tok, "ok 😀 then")
    assert any(p.endswith("\ufffd") for p in pieces)
    decoder = IncrementalDetokenizer(tok, stop=["😀"])
    deltas = stream(decoder, ids)
    assert "".join(deltas) == "ok " and decoder.stopped_on == "😀"
    assert not any("\ufffd" in d for d in deltas)


def test_stop_prefix_held_until_finish_is_flushed(tok):
    ids, _ = ids_and_pieces(tok, "wait for the END")
    decoder = IncrementalDetokenizer(tok, stop=["END!"])
    text = "".join(decoder.add([i])[0] for i in ids)
    assert text == "wait for the "
    assert decoder.finish() == "END" and decoder.stopped_on is None


def test_random_stops_match_a_reference(tok):
    """Deltas equal the reference truncation at the earliest stop, for random splits."""
    rng = random.Random(99)
    for _ in range(150):
        text = random_text(rng, rng.randrange(5, 50))
        ids = tok.encode(text, add_special_tokens=False)
        full = tok.decode(ids)
        stops = [full[a : a + rng.randrange(1, 6)] for a in rng.sample(range(len(full)), 2)]
        stops += [random_text(rng, 3)]
        include = rng.random() < 0.5
        decoder = IncrementalDetokenizer(tok, stop=stops, include_stop_str_in_output=include)
        got = "".join(stream(decoder, ids, [rng.randrange(1, 4)]))
        # NOTE: the stop completed first in the stream wins (then the one starting first)
        hits = [(full.find(s) + len(s), full.find(s), s) for s in stops if s and s in full]
        _, start, stop = min(hits)
        assert got == full[: start + (len(stop) if include else 0)], (full, stops)
        assert "\ufffd" not in got or "\ufffd" in full


def test_token_texts_for_logprobs(tok):
    ids, _ = ids_and_pieces(tok, "Hello world")
    assert token_texts(tok, ids + [2]) == ["Hello", " world", "<|im_end|>"]
    assert IncrementalDetokenizer(tok).token_texts(ids) == ["Hello", " world"]


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_a_cut_inside_a_character_drops_its_bytes(tok, sp_tok, cut):
    """max_tokens or a stop token inside a multi-byte character: the text ends on the last
    whole character, never on U+FFFD (byte-level BPE and byte fallback alike)."""
    for tokenizer, encode in ((tok, lambda t: tok.encode(t, add_special_tokens=False)),
                              (sp_tok, lambda t: sp_tok.encode(t).ids)):  # fmt: skip
        ids = encode("ok 😀")
        partial = ids[:-1]  # NOTE: the emoji's last byte is in the last token
        assert tokenizer.decode(partial).endswith("\ufffd")
        deltas = stream(IncrementalDetokenizer(tokenizer), partial, [cut])
        assert "".join(deltas) == "ok "
