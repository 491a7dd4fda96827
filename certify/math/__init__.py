"""The mathematics of certification, free of Lightning: bounds, Theorem 1's radius, PREDICT.

- ``bounds``: exact one-sided Clopper-Pearson bounds, the SimuEM and BinoCP estimators.
- ``radius``: ``certified_radius`` from counts, ``radius_from_bounds`` from given bounds.
- ``prediction``: ``top_k_set``, the smoothed top-k label set or an abstention, and
  ``certified_prediction``, the set chosen on one sample with a radius per label from another.
- ``sequential``: ``certify_sequential``, the certificates of CERTIFY from rounds of samples.
- ``mixture``: ``mixture_bounds``, the Beta-mixture confidence sequence of a Bernoulli mean.
- ``validation``: the argument checks every part of the project shares.
"""
