"""What trains and tunes: a run's folder (``rundir``), tuning runs into a model folder (``tuning``) and evaluating a
model folder on labelled images (``evaluation``). The training loop itself is a stage's (:mod:`cascade.stages`)."""
