"""The sampler: Monte Carlo counts of a base classifier under Gaussian noise.

- ``smoothing``: ``SmoothedClassifier`` (``sample_counts`` and its sampling loop, the
  automatic batch size, ``certify``, ``predict``, ``predict_certified``, ``certify_sequential``).
- ``noise``: the seeded noise streams (a sample is a pure function of seed, id, purpose and
  index).
- ``options``: checks of the forward pass's options (autocast, compile).
"""
