"""Evaluate a checkpoint: python eval.py ckpt_path=PATH (see README.md)."""

from genlab.cli.evaluate import main

if __name__ == "__main__":
    main()
