"""The notebook's looks inside a model, made by every run (``callbacks.insight``): in TensorBoard
while training, and as PNG files in ``<run>/insight/`` at the end. ``callback.Insight`` decides when
to look and keeps what it saw; each picture is its own module:

- ``losses``: ``loss_curves.png``, the training loss of every update, its mean over windows of
  updates (the notebook's ``view(-1, 1000).mean(1)``), and the validation loss on the same axes.
- ``update_ratio``: ``update_ratio.png``, log10 of (update size / weight size), std over each weight
  matrix, every ``every_n_steps`` updates; the notebook's rule of thumb is about -3.
- ``activations``: ``activations.png``, for the tanh layers a model declares (``tanh_layers()``:
  mlp, wavenet, rnn), histograms of pre-activations and activations with the share of saturated
  units (|tanh| > 0.97), also logged as ``network/saturated/<layer>`` through training; measured in
  eval mode on 64 validation names, at the positions that predict a real character.
- ``embedding``: ``embedding.png``, the characters' embedding vectors (``token_embeddings()``) in
  2-D (PCA when wider); also TensorBoard's embedding projector with the characters as labels.
- ``bigram``: ``bigram_counts.png``, ``bigram_probs.png``, the table a model declares
  (``count_table()``: the counting bigram), annotated.
"""

from genlab.insight.callback import Insight
from genlab.insight.embedding import pca_2d
from genlab.insight.losses import window_means

__all__ = ["Insight", "pca_2d", "window_means"]
