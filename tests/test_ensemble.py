"""Ensembles: bootstrap resamples of the training windows, and averaging that beats the mean member."""
import numpy as np
import pytest

from enhanced_tft.config import build_config
from enhanced_tft.data.pipeline import build_data
from enhanced_tft.train.ensemble import bootstrap_windows


def test_bootstrap_resamples_train_windows_only_and_copies_no_data(small_raw):
    data = build_data(build_config(small_raw))
    train = data.splits["train"]
    first, again, other = (bootstrap_windows(data, seed) for seed in (7, 7, 8))
    resampled = first.splits["train"]
    assert len(resampled) == len(train) and resampled.arrays is train.arrays          # indices only, no copy
    assert first.splits["val"] is data.splits["val"] and first.splits["test"] is data.splits["test"]
    assert set(resampled.sample_ends.tolist()) <= set(train.sample_ends.tolist())
    unique = len(np.unique(resampled.sample_ends.numpy())) / len(train)
    assert 0.55 < unique < 0.72                                  # with replacement: about 1 - 1/e = 0.632 distinct
    assert resampled.sample_ends.tolist() == again.splits["train"].sample_ends.tolist()   # same seed, same resample
    assert resampled.sample_ends.tolist() != other.splits["train"].sample_ends.tolist()
    assert data.splits["train"] is train                                              # the bundle is not changed
