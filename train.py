"""Train a model: python train.py model=mlp data=names [key=value ...] (see README.md)."""

from genlab.cli.train import main

if __name__ == "__main__":
    main()
