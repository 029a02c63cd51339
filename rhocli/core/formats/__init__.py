"""One home per on-disk format: a reader and a writer each, on one manifest type.

=============  ===================  ==============================================================
format         module               files
=============  ===================  ==============================================================
tokens         ``tokens``           PREFIX.bin/.idx (megatron IndexedDataset) + PREFIX.json
scores         ``scores``           PREFIX.bin/.idx (float32 per token) + PREFIX.json; PREFIX.rho-work/
masks          ``masks``            PREFIX.bin/.idx (uint8 per token) + PREFIX.json
checkpoint     ``checkpoint``       RUN/step_NNNNNN/ (dist_checkpointing + rho_checkpoint.json), RUN/latest
metrics        ``metrics``          RUN/metrics.jsonl
Hugging Face   ``hf``               config.json, *.safetensors (+ index), tokenizer files
=============  ===================  ==============================================================

``manifest.ManifestType`` is the one place a manifest's ``format`` / ``format_version`` are written
and checked; ``staging.StagedOutput`` publishes outputs only when complete. docs/formats.md
describes every field.
"""
