"""Diffusion transformers (DiT), EVAR's second generator family: the model with facebookresearch/DiT's key
names (`model`), its diffusion and DDIM sampling (`diffusion`), model directories and release files
(`checkpoint`), training (`train`), pruning through the shared adapter API (`prune`, with
`evar.prune.dit_adapter`), distillation of a pruned DiT (`distill`), sample sets (`sample`) and the CLI
bodies (`commands`)."""
