"""``rho tokenize``: text files -> a Megatron token dataset + manifest (``pipeline.run_tokenize``)."""
