"""Bookkeeping for commands that run many training jobs: `cv`'s folds (plan, launch, score, summarise)."""
