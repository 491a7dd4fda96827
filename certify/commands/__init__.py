"""The ``topk-smoothing`` commands.

- ``cli``: the console entry point (``SmoothingCLI`` for fit, validate, test, certify and
  predict; argparse for radius and report) and its one-line errors.
- ``runner``: ``CertifyingTrainer.certify`` and ``predict``, resumable and sharded over
  processes (``task``: the sampling loop; ``outputs``: the output directory).
- ``checkpoints``: our Lightning checkpoints and Cohen et al.'s released models, read
  weights only unless trusted.
- ``countfile``: the authors' count-file format; ``report``: tables and plots.
"""
