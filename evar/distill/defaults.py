"""Default distillation settings, the one place they are defined (torch-free, so `--help` can show them).

Chosen on builtin:digits pruned 40% with OBS, to finish within 10 minutes on 2 CPU cores
(benchmarks/distill_digits.py).
"""
KD = "both"
TEMPERATURE = 4.0
ALPHA = 0.5
BETA = 0.5
FEATURE_WEIGHT = 0.0
DATA = "teacher"
DATA_SAMPLES = 2000
# The teacher's generations are drawn from its own conditional distribution: no guidance, no top-k/top-p.
# The task loss's targets then follow the teacher's distribution; guided samples would bake CFG into the
# student, and CFG applied again at sampling time over-sharpens it (higher accuracy, worse Fréchet distance).
DATA_CFG, DATA_TOP_K, DATA_TOP_P = 0.0, 0, 0.0
STEPS = 300
BATCH_SIZE = 32
LR = 3e-4
WEIGHT_DECAY = 0.0
WARMUP = 20
CKPT_EVERY = 100
