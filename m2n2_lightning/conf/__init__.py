"""The Hydra configs of m2n2-train / train.py, shipped inside the package."""
