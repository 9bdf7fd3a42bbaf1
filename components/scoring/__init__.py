"""Batch-scoring helpers: where the files to score come from (see components/score.py)."""
