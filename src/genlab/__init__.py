"""genlab: a Hydra-configured experiment framework for the generative models of a course on
language models and GANs."""

__version__ = "0.1.0"
