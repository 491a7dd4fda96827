"""The sampler: Monte Carlo counts of a base classifier under Gaussian noise.

- ``smoothing``: ``SmoothedClassifier`` (``sample_counts``; from ``decisions``: ``certify``,
  ``predict`` and ``predict_certified``).
- ``noise``: the seeded noise streams (a sample is a pure function of seed, id and index).
- ``packing``: how the samples of several inputs share forward batches.
- ``batching``: the labelling forward pass and the automatic batch size.
- ``options``: checks of the forward pass's options (autocast, compile).
"""
