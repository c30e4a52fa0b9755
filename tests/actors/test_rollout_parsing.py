"""Cutting sampled reasoning at the score prefix, the canonical prefix ids, and malformed-output codes."""

from types import SimpleNamespace

import pytest

from actors.teacher_engine.rollouts import PrefixIds, as_requests, collapse_placeholders, cut_before, split_sample
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


def test_requests_must_not_carry_reasoning():
    with pytest.raises(ValueError, match="reasoning"):
        as_requests([("a red circle", None, "alignment", "already reasoned")])
    with pytest.raises(ValueError, match="empty"):
        as_requests([])
