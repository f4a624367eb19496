"""`python -m m2n2_lightning ...`: the Hydra app of train.py."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (m2n2_lightning/threads.py)

from m2n2_lightning.train import main

main()
