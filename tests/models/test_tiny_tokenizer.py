"""The local tokenizer: score tokens are single ids, Qwen special tokens and chat template are in place."""

import pytest

from zray.models import tiny
from zray.rubric import build_messages
from zray.scores import SCORE_TOKENS, score_token_ids


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


def test_score_tokens_are_single_ids(tok):
    ids = score_token_ids(tok)
    assert ids == list(range(len(tok) - 9, len(tok)))  # the last nine ids
    for text, i in zip(SCORE_TOKENS, ids):
        assert tok.convert_ids_to_tokens(i) == text
    # inside text too, with the fixed prefix before it
    assert tok.convert_ids_to_tokens(tok.encode("Score: <s_3.5>"))[-1] == "<s_3.5>"
    # not special: a decoded answer keeps its score token
    assert "<s_4.0>" in tok.decode(tok.encode("ok <s_4.0>"), skip_special_tokens=True)


def test_special_tokens_first(tok):
    for i, text in enumerate(tiny.SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(text) == i
        assert tok.encode(text, add_special_tokens=False) == [i]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_vocab_small_and_digits_split(tok):
    assert 400 <= len(tok) <= 1000
    assert tok.convert_ids_to_tokens(tok.encode("2026")) == ["2", "0", "2", "6"]
    pieces = tok.convert_ids_to_tokens(tok.encode("two red circles on a white background"))
    assert len(pieces) <= 8  # Shapes-world words are mostly single tokens


def test_chat_template_renders(tok):
    text = tok.apply_chat_template(build_messages("a red circle", "alignment", reasoning=False), tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")
    assert "<|vision_start|><|image_pad|><|vision_end|>Prompt: a red circle" in text
    assert text.endswith("<|im_start|>assistant\n")
    plain = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert plain == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                     "<|im_start|>assistant\n")


def test_deterministic_and_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    again = tiny.build_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "I see 3 red stars. Score: <s_2.5><|im_end|>"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
