"""Worker-side training machinery (torch + DeepSpeed, no Ray): what a learner trains and how it steps.

    task.py    the task protocols (LearnerTask, OnlineTask, StatefulTask, LengthGrouped)
    engine.py  TrainEngine: DeepSpeed ZeRO or DDP around a task's model, precision, schedule, checkpoints
    shards.py  ShardBatches: one worker's data shard served as micro batches by index (exact resume)
    runs.py    run bookkeeping on disk: checkpoints, training time, time budgets, the exported model

The Ray Train side (TorchTrainer, checkpoints through `ray.train.report`, resume) is `actors/learner/`.
"""
