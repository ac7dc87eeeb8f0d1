"""The supervised engine: the training loop, evaluation, optimisers and schedules, EMA, precision."""
