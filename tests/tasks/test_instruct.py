"""The instruction phase's task (`zray.tasks.instruct`): targets are the rationale and the score prefix only; the
score token carries no loss (it is not in the sequence); the loss is transformers' own LM loss on those labels."""

import numpy as np
import pytest
import torch

from zray.config import WorldConfig
from zray.data.rationales import instruct_corpus
from zray.rubric import SCORE_PREFIX, SCORE_TOKENS
from zray.tasks.instruct import IGNORE_INDEX, InstructTask, answer_labels

WORLD = WorldConfig(num_train_prompts=8, num_test_prompts=4, num_heldout_prompts=4, candidates_per_prompt=2,
                    image_size=32)


@pytest.fixture(scope="module")
def rows():
    cols = instruct_corpus(WORLD, 1, progress=False).to_pydict()  # 2 candidates x 4 dimensions
    return {k: np.array(v, dtype=object) for k, v in cols.items()}


@pytest.fixture(scope="module", params=["teacher", "student"])  # Qwen2.5-VL and Qwen3-VL in the tiny zoo config
def task(request, tiny_zoo):
    return InstructTask(model_dir=str(tiny_zoo[request.param]["path"]))


def test_labels_are_exactly_the_rationale_and_the_score_prefix(task, rows):
    batch = task.collate(rows)
    tok = task.processor.tokenizer
    score_ids = set(tok.convert_tokens_to_ids(list(SCORE_TOKENS)))
    assert not score_ids & set(batch["input_ids"].flatten().tolist())  # the score token is never in the sequence
    lengths = batch["attention_mask"].sum(-1)
    for b, rationale in enumerate(rows["rationale"]):
        labelled = batch["labels"][b][batch["labels"][b] != IGNORE_INDEX].tolist()
        assert tok.decode(labelled) == f"{rationale} {SCORE_PREFIX}"
        assert int(batch["labels"][b, int(lengths[b]) - 1]) != IGNORE_INDEX  # through the last real token ...
        assert (batch["labels"][b, int(lengths[b]):] == IGNORE_INDEX).all()  # ... and nothing on padding


def test_loss_is_the_mean_cross_entropy_of_the_answer_tokens(task, rows):
    batch = task.collate({k: v[:3] for k, v in rows.items()})
    model = task.build_model().eval()
    loss, metrics = task.loss(model, batch)
    with torch.no_grad():
        reference = model(**batch, use_cache=False).loss  # transformers' shifted, -100-masked mean CE
    assert float(loss.detach()) == pytest.approx(float(reference), rel=1e-5)
    assert metrics["answer_tokens"] == float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_a_row_without_an_answer_is_refused(task):
    tok = task.processor.tokenizer
    ids = torch.tensor([tok("<|im_start|>user\nhello", add_special_tokens=False)["input_ids"]])
    with pytest.raises(ValueError, match="row 0: no assistant answer"):
        answer_labels(ids, torch.ones_like(ids), tok)
