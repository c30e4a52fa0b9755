"""Worker-side training machinery (torch + DeepSpeed, no Ray): what a learner trains and how it steps.

The Ray Train side (TorchTrainer, checkpoints through `ray.train.report`, resume) is `actors/learner/`.
"""
