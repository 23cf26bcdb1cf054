"""One file per network. Language models share ``base.LanguageModel``: (B, T) ids -> (B, T, V) logits."""
