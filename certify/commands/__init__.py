"""The ``topk-smoothing`` commands: ``certify``, ``report`` and ``radius``.

- ``cli``: the console entry point; Lightning subcommands go to ``lightning_modules.cli``.
- ``runner``: ``CertifyingTrainer.certify``, resumable and sharded over processes.
- ``settings``: checks of the ``certify`` options before anything is built.
- ``outputs``: the output directory (part files, merge, ``certify.json``).
- ``checkpoints``: our Lightning checkpoints and Cohen et al.'s released models.
- ``countfile``: the authors' count-file format; ``report``: tables and plots.
"""
