"""The update loop: how a run turns batches into optimizer updates. ``steps`` owns K (the updates
one Lightning step makes) with the base models: the ``loop.*`` settings, grouping the data's plain
batches K to a Lightning step, counting each update as a step and calling the update hooks around
it, and the validation interval in updates. ``precision`` chooses ``trainer.precision: auto`` for
the card, and ``lr_finder`` runs the learning-rate search of ``tune_lr=true`` before training."""
