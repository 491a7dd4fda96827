"""The ``topk-smoothing`` commands: ``certify``, ``predict``, ``report`` and ``radius``.

- ``cli``: the console entry point; Lightning subcommands go to ``lightning_modules.cli``.
- ``runner``: ``CertifyingTrainer.certify``, resumable and sharded over processes.
- ``predict``: ``smoothed_predict``, the top-k sets with a radius per label (``predict``),
  on ``runner``'s machinery; ``predict_output``: its rows; ``images``: a folder of images.
- ``settings``: checks of the ``certify`` options before anything is built.
- ``startup``: the start-up line and the default output directory of a run.
- ``outputs``: the output directory (part files, merge, ``certify.json``).
- ``checkpoints``: our Lightning checkpoints and Cohen et al.'s released models, read
  weights only unless trusted.
- ``countfile``: the authors' count-file format; ``report``: tables and plots.
"""
