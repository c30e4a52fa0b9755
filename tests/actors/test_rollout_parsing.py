"""Cutting sampled reasoning at the score prefix, the canonical prefix ids, and malformed-output codes."""

from types import SimpleNamespace

import pytest

from actors.teacher_engine.rollouts import (PrefixIds, StopRule, as_requests, collapse_placeholders, cut_before,
                                            reasoning_text, split_sample)
from zray.types import FINISH_EOS, FINISH_LENGTH, FINISH_PREFIX


@pytest.fixture(scope="module")
def tok():
    from zray.models.tiny import build_tokenizer

    return build_tokenizer()


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def _decode(tok):
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text, kept", [
    ("two red circles Score:", "two red circles"),
    ("Score:", ""),
    ("a blue square. Score: <s_4.0>", "a blue square."),
    ("Score Score:", "Score"),
])
def test_cut_before_keeps_the_tokens_before_the_prefix(tok, text, kept):
    ids = _ids(tok, text)
    k = cut_before(_decode(tok), ids, "Score:")
    assert tok.decode(ids[:k]).rstrip() == kept
    assert "Score:" not in tok.decode(ids[:k]) and "Score:" in tok.decode(ids[: k + 2])


def test_cut_before_absent(tok):
    assert cut_before(_decode(tok), _ids(tok, "no prefix here"), "Score:") is None


def test_prefix_ids_after(tok):
    prefix = PrefixIds(tok)
    assert tok.decode(prefix.spaced) == " Score: " and tok.decode(prefix.bare) == "Score: "
    assert prefix.after([]) == prefix.bare
    assert prefix.after(_ids(tok, "red")) == prefix.spaced
    assert prefix.after(_ids(tok, "red ")) == prefix.bare


def test_collapse_placeholders():
    assert collapse_placeholders([1, 7, 7, 7, 2, 7, 3], 7) == [1, 7, 2, 7, 3]
    assert collapse_placeholders([1, 7, 7], None) == [1, 7, 7]


def _completion(tok, text, finish_reason, stop_reason=None, extra=()):
    return SimpleNamespace(token_ids=_ids(tok, text) + list(extra), finish_reason=finish_reason,
                           stop_reason=stop_reason)


def test_split_sample_codes(tok):
    dec = _decode(tok)
    c = _completion(tok, "ok Score:", "stop", "Score:")
    assert split_sample(c, dec) == (len(_ids(tok, "ok")), FINISH_PREFIX)
    c = _completion(tok, "red red red", "length")
    assert split_sample(c, dec) == (len(c.token_ids), FINISH_LENGTH)
    c = _completion(tok, "red", "stop", None, extra=[tok.eos_token_id])  # eos is the last token: dropped
    assert split_sample(c, dec) == (len(c.token_ids) - 1, FINISH_EOS)
    with pytest.raises(RuntimeError, match="finish_reason='abort'"):
        split_sample(_completion(tok, "red", "abort"), dec)


def test_stop_rule_stops_on_the_word_score_as_a_token(tok):
    rule = StopRule(tok)
    spellings = {_ids(tok, "Score:")[0], _ids(tok, " Score:")[0]}
    assert set(rule.token_ids) == spellings and len(spellings) == 2
    assert all(tok.decode([i]).strip() == "Score" for i in rule.token_ids)
    assert rule.sampling_kwargs() == {"stop_token_ids": list(rule.token_ids), "detokenize": False}


def test_stop_rule_stops_on_the_text_when_the_tokenizer_splits_the_word():
    class Split:  # "Score" spelled as "Sc" + "ore"
        vocab = {"Sc": 1, "ore": 2, ":": 3, " ": 4, " Sc": 5}

        def encode(self, text, add_special_tokens=False):
            return [self.vocab[p] for p in {"Score: ": ["Sc", "ore", ":", " "],
                                            " Score: ": [" Sc", "ore", ":", " "]}[text]]

        def decode(self, ids):
            names = {v: k for k, v in self.vocab.items()}
            return "".join(names[i] for i in ids)

    rule = StopRule(Split())
    assert rule.token_ids == () and rule.sampling_kwargs() == {"stop": ["Score:"]}


def test_split_sample_on_a_stop_token(tok):
    dec, rule = _decode(tok), StopRule(tok)
    score = _ids(tok, " Score")[0]
    assert score in rule.token_ids
    c = _completion(tok, "two red circles", "stop", score, extra=[score])  # stopped on " Score": dropped
    assert split_sample(c, dec, rule.token_ids) == (len(_ids(tok, "two red circles")), FINISH_PREFIX)
    # another spelling of the prefix earlier in the text wins over the stop token
    c = _completion(tok, "red Score: blue", "stop", score, extra=[score])
    assert split_sample(c, dec, rule.token_ids) == (len(_ids(tok, "red")), FINISH_PREFIX)
    c = _completion(tok, "red Score: blue", "length")  # ran to the budget, but the prefix is in the text
    assert split_sample(c, dec, rule.token_ids) == (len(_ids(tok, "red")), FINISH_PREFIX)
    c = _completion(tok, "red", "stop", None, extra=[tok.eos_token_id])  # eos, not a stop token
    assert split_sample(c, dec, rule.token_ids) == (len(c.token_ids) - 1, FINISH_EOS)


def test_evaluation_reasoning_ends_where_a_rollout_s_does(tok):
    """`reasoning_text` (the engine's `generate_texts`) keeps the text `split_sample` keeps: a sample stopped by
    the word "Score" loses it whatever would have followed (a rollout forces "Score: " there), a text prefix cuts,
    an end-of-turn token goes, a length stop keeps everything."""
    dec, rule = _decode(tok), StopRule(tok)
    score = _ids(tok, " Score")[0]
    cases = [(_completion(tok, "defects: none", "stop", score, extra=[score]), "defects: none"),
             (_completion(tok, "red Score: blue", "length"), "red"),
             (_completion(tok, "red", "stop", None, extra=[tok.eos_token_id]), "red"),
             (_completion(tok, "red red", "length"), "red red")]
    for c, text in cases:
        assert reasoning_text(c, dec, rule.token_ids) == text
        keep, _ = split_sample(c, dec, rule.token_ids)
        assert dec(c.token_ids[:keep]).strip() == text


def test_requests_must_not_carry_reasoning():
    with pytest.raises(ValueError, match="reasoning"):
        as_requests([("a red circle", None, "alignment", "already reasoned")])
    with pytest.raises(ValueError, match="empty"):
        as_requests([])
