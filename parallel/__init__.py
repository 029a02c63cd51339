"""rho's engine over megatron-core: process groups, the Llama/Mistral GPTModel, data feeding,
the pipeline schedule, optimizer and checkpoints. The only package that imports megatron-core's
distributed parts. (Lands with the `rho train` issue.)"""
