"""``rho convert-hf``: Hugging Face <-> rho checkpoints (``hf.import_hf``, ``hf.export_hf``)."""
