"""What a genlab data module is to the rest of genlab: the contract the training run, the loop and the
evaluation use, with its defaults, so that none of them probes a data module for what it has.

A data module is built from its config (``conf/data/*.yaml``) with its settings checked and nothing
read. ``prepare_data()`` then puts its files on disk (fetched from the cache, a mirror or the web,
tokenised into the token cache), and ``setup()`` loads them (the splits, the vocabulary, the
fingerprint), as Lightning documents the two: ``genlab.cli.train`` calls both before it builds the model
(whose sizes come from the data), and a second ``setup()`` (Lightning's own, at ``fit``) finds it done.

Training reads ``train_dataloader()``: plain ``(x, y)`` batches for a language model, one per
optimizer update, trailing padding (targets -1) allowed (the loop groups them and trims each,
``genlab.loop.steps``), or image batches; validation and test read
``val_dataloader()`` and ``test_dataloader()`` (an image data module's validation batches are the
noise its model generates from, which the run's quality measure gives it)."""

from __future__ import annotations

import lightning as L


class GenlabDataModule(L.LightningDataModule):
    kind = "text"  # the kind of model it feeds: "text" or "image"
    # data.sampling=sequential: consecutive training batches continue each other row by row, so a
    # recurrent model may carry its state from one batch to the next
    sequential = False
    # the final figures (metrics.json) cover the whole validation and test splits even where the
    # validations during training take a sample of them
    final_whole_split = False

    def __init__(self):
        super().__init__()
        self.prepared = self.loaded = False

    # --- Lightning's two steps --------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Put the data's files on disk, once (``download``)."""
        if not self.prepared:
            self.download()
            self.prepared = True

    def setup(self, stage: str | None = None) -> None:
        """Load the data, once (a second call finds it loaded); prepares it first where that was not
        done in this process (Lightning prepares on one process of a node)."""
        if not self.loaded:
            self.prepare_data()
            self.load()
            self.loaded = True

    def download(self) -> None:
        """What ``prepare_data`` does: the data's files on disk."""

    def load(self) -> None:
        """What ``setup`` does the first time: read the files ``prepare_data`` put on disk."""
        raise NotImplementedError

    # --- what a run reads of it, once set up ----------------------------------------------------------
    fingerprint: str | None = None  # a hash of the data's content, which the run's plan compares (genlab.run.plan)

    def model_sizes(self) -> dict:
        """The sizes a model built for this data takes from it, never typed twice: a language
        model's ``tokenizer`` (its config), ``seq_len`` and ``sequential``; an image model's ``image_size``."""
        raise NotImplementedError

    def training_words(self) -> set[str] | None:
        """The training split's words, where the data is a word list (sampling measures novelty)."""
        return None

    def training_widths(self) -> list[int] | None:
        """Every width a training batch can have, where known (the compiled update compiles each first)."""
        return None

    # --- what the final evaluation reads ------------------------------------------------------------
    has_test = True  # whether there is a test split
    test_split = "test"  # the split the final test loss is measured on

    def evaluation_scope(self, split: str, whole_split: bool = False) -> dict | None:
        """What an evaluation of ``split`` covers: ``{"tokens", "whole_split", "description"}``, or
        None where it is always the whole split and says nothing more."""
        return None


def ready(datamodule: GenlabDataModule) -> GenlabDataModule:
    """``datamodule`` prepared and set up (Lightning's two steps), as a run uses it."""
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule
