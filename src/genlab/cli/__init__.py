"""Entry points and the command line: what ``python train.py``, ``eval.py``, ``sample.py`` and
``make reproduce`` run. ``train`` is the path of one run, top to bottom; ``evaluate`` gives a
checkpoint's validation and test loss, ``sample`` samples from a checkpoint alone, ``reproduce``
runs every experiment of the course and its report; ``overrides`` checks the command line before
Hydra runs it ("did you mean" for a key that does not exist). What a run prints is
``genlab.console``, kept at the top level because ``conf/hydra/job_logging/`` names it."""
