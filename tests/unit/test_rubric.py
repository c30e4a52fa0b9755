"""Scoring prompts: rubric per dimension, messages, and the rendered score context."""

import pytest

from zray import rubric as prompts


class _Chat:
    """Renders messages like a chat template, enough to check the structure."""

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        parts = []
        for m in messages:
            body = "".join("<image>" if c["type"] == "image" else c["text"] for c in m["content"])
            parts.append(f"[{m['role']}]{body}")
        return "".join(parts) + ("[assistant]" if add_generation_prompt else "")


def test_rubrics_have_five_levels():
    assert set(prompts.RUBRICS) == set(prompts.DIMENSIONS)
    for dim in prompts.DIMENSIONS:
        text = prompts.rubric_text(dim)
        assert all(f"{level}: " in text for level in range(1, 6))


def test_build_messages():
    msgs = prompts.build_messages("a red circle", "realism", reasoning=True)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "Rubric for realism" in msgs[0]["content"][0]["text"]
    assert msgs[1]["content"][0] == {"type": "image"}
    assert "Explain briefly" in msgs[1]["content"][1]["text"]
    assert "Explain" not in prompts.build_messages("a red circle", "realism", reasoning=False)[1]["content"][1]["text"]


def test_dimension_and_prompt_validated():
    with pytest.raises(ValueError, match=r"dimension='beauty' is not allowed: expected one of \('alignment'"):
        prompts.build_messages("a red circle", "beauty", reasoning=False)
    with pytest.raises(ValueError, match="prompt=''"):
        prompts.ScoreRequest("", None, "alignment")


def test_score_context_forms():
    chat = _Chat()
    student = prompts.render_score_context(chat, "a red circle", "alignment")
    teacher = prompts.render_score_context(chat, "a red circle", "alignment", reasoning=" I see a red circle. ")
    assert student.endswith("Give the score.[assistant]")
    assert teacher.endswith("[assistant]I see a red circle. Score: ")
    assert prompts.answer_text("<s_3.0>", "I see it.") == "I see it. Score: <s_3.0>"
    assert prompts.answer_text("<s_3.0>", None) == "<s_3.0>"
    assert prompts.answer_prefix("") == "Score: "
