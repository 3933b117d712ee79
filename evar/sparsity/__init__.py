"""Semi-structured (N:M) and unstructured weight sparsity: one-shot masks (magnitude, Wanda, SparseGPT),
learnable masks (MaskLLM), and the masks' place in a model directory (`storage`)."""
