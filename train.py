"""`python train.py ...`: the same Hydra app as the installed `m2n2-train` (m2n2_lightning/train.py)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (m2n2_lightning/threads.py)

from m2n2_lightning.train import main

if __name__ == "__main__":
    main()
