"""Leaf utilities every stage uses: errors (the one exit-code table), config, the launcher, on-disk
formats, tokenizers, fingerprints, plots. Imports no stage, no command, and not the engine."""
