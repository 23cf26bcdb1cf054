"""What a run reports, beside its losses: ``figures`` draws the pictures a run writes as files
(image grids, an animated GIF, curves), ``quality`` measures an image model's pictures (FID and
KID), ``hparams`` gives TensorBoard's HPARAMS tab a run's parameters and losses; across runs,
``compare`` tables finished runs by the parameters that really differ between them
(``scripts/compare.py``) and ``report`` makes one self-contained HTML page of them
(``scripts/report.py``)."""
