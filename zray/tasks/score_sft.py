"""SFT baseline of the reward teacher (methods.md §2 baselines): `(p, I, d) -> score token`, no reasoning (or, as a
diagnostic, the true rationale given in context: `rationales`).

Each pair row (`zray.data.pair_examples`) gives two examples, winner and loser, with their labels. The context
is the student form of `zray.rubric` (the score is the first answer token); the loss is the cross-entropy of
the nine-bin score distribution q at that position against the label bin (the same decoder as everywhere:
softmax over the score tokens' logits). The saved model carries `zray_scoring.json` = {"form": "direct"}, so
`zray evaluate` scores it the way it was trained.

Shape legend: B examples (2 per pair), K = 9 score bins.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zray.data.render import decode_png
from zray.rubric import BUILTIN_RUBRIC, Rubric, ScoreRequest
from zray.models.vlm import (cached_processor, load_vlm_weights, save_vlm, score_inputs, trainable_vlm,
                            write_scoring_file)
from zray.scores import label_index, score_bins, score_token_ids

def pair_requests(rows: dict[str, Any], *, reasoning: str | None = None, rubric: Rubric = BUILTIN_RUBRIC,
                  rationales: bool = False) -> tuple[list[ScoreRequest], torch.Tensor]:
    """[winner, loser] ScoreRequests per pair row (each dimension with its anchors in `rubric`: an import's rubric
    for imported data), and labels_P2 (float32). The reasoning of every request is `reasoning`, or with
    `rationales` each side's own `<side>_rationale` column (`pair_examples(..., rationales=True)`)."""
    requests, labels = [], []
    for p in range(len(rows["prompt"])):
        dim = str(rows["dimension"][p])
        for side in ("winner", "loser"):
            text = str(rows[f"{side}_rationale"][p]) if rationales else reasoning
            requests.append(ScoreRequest(str(rows["prompt"][p]), decode_png(bytes(rows[f"{side}_image"][p])),
                                         dim, text, rubric.anchors_for(dim)))
        labels.append([float(rows["winner_label"][p]), float(rows["loser_label"][p])])
    return requests, torch.tensor(labels, dtype=torch.float32)


@dataclass(frozen=True, kw_only=True)
class ScoreSFTTask:
    """Cross-entropy on the label bin of q at the student-form score position (a `LearnerTask`).

    With `rationales`, the rows carry each candidate's ground-truth rationale (`pair_examples(...,
    rationales=True)`) and q is read after it, at the reasoning form's score position (the rationale in context,
    not trained): a diagnostic of how well the model scores when its reasoning is right. The saved model then
    scores in the reasoning form (its own greedy reasoning, or the truth with `evaluate.reasoning = "truth"`)."""

    model_dir: str
    name: str = "teacher_sft"
    rubric: Rubric = BUILTIN_RUBRIC  # the dimensions' anchors in the scoring prompt (an import's rubric)
    rationales: bool = False

    @property
    def processor(self) -> Any:
        return cached_processor(str(self.model_dir))

    def build_model(self) -> torch.nn.Module:
        return trainable_vlm(self.model_dir)

    def collate(self, rows: dict[str, Any]) -> dict[str, torch.Tensor]:
        requests, labels_P2 = pair_requests(rows, rubric=self.rubric, rationales=self.rationales)
        # left padding (score_inputs): the last position of every row is its score position
        batch = {k: v for k, v in score_inputs(self.processor, requests).items() if isinstance(v, torch.Tensor)}
        batch["label_index"] = torch.tensor([label_index(float(s)) for s in labels_P2.flatten()], dtype=torch.int64)
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        target_B = batch["label_index"]
        out = model(**{k: v for k, v in batch.items() if k != "label_index"}, logits_to_keep=1, use_cache=False)
        ids = torch.as_tensor(score_token_ids(self.processor), device=target_B.device)
        log_q_BK = torch.log_softmax(out.logits[:, -1, :].float()[:, ids], dim=-1)
        loss = torch.nn.functional.nll_loss(log_q_BK, target_B)
        with torch.no_grad():
            mu_B = (log_q_BK.exp() * score_bins(log_q_BK.device)).sum(-1)
            gap_ok = (mu_B[0::2] > mu_B[1::2]).float().mean()
            acc = (log_q_BK.argmax(-1) == target_B).float().mean()
        return loss, {"ce_loss": float(loss.detach()), "bin_acc": float(acc), "pair_acc": float(gap_ok),
                      "mu_mean": float(mu_B.mean())}

    def save_pretrained(self, model: torch.nn.Module, out_dir: Path) -> None:
        write_scoring_file(save_vlm(model, self.model_dir, out_dir), form="reasoning" if self.rationales else "direct",
                           method="sft_rationales" if self.rationales else "sft")

    def load_pretrained(self, model: torch.nn.Module, ckpt_dir: Path) -> None:
        load_vlm_weights(model, ckpt_dir)
