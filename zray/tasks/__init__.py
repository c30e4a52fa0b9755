"""Training objectives, one file each, every one a task on the one learner engine (`zray.training.task`).

    caption.py        CaptionTask: image -> scene description (pre-training the base VLMs)
    vision_warmup.py  VisionWarmupTask: the vision tower alone on scene attributes and object maps
    score_sft.py      ScoreSFTTask: the label bin as one score token, no reasoning (SFT baseline)
    gdso.py           GDSOTask: GDSO / GRPO group rollouts from the teacher engines (an OnlineTask)
    vae.py            VAETask: the Z-Image VAE on clean renders
    flow.py           FlowTask: the Z-Image transformer by flow matching

A task is plain configuration shipped to every Ray Train worker: `build_model`, `collate`, `loss`,
`save_pretrained`, `load_pretrained` (plus `before_rollout` for online tasks and `task_state` for tasks with
worker-side state). Its pure loss lives in `zray.losses` when it has one; no Ray here.
"""
