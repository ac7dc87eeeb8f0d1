"""Training: the trainer and its tasks, evaluation, probes, optimisers and schedules."""
