"""Sample from a checkpoint: python sample.py ckpt_path=PATH [num_samples=20] (see README.md)."""

from genlab.cli.sample import main

if __name__ == "__main__":
    main()
