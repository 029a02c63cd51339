"""``rho verify``: a full content check of stores and checkpoints (``checks.verify_path``)."""
