"""What runs while training: the certified top-k accuracy metric and the Lightning callback.

- ``metric``: ``CertifiedTopKAccuracy``, a torchmetrics metric with exact DDP reduction, and
  ``markdown_table``, the table the callback prints and ``report`` writes.
- ``callback``: ``CertificationCallback``, certified accuracy after validation epochs.
"""
