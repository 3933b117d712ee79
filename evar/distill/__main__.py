"""`python -m evar.distill ARGS` ≡ `evar distill ARGS`; the form torchrun launches:

    torchrun --nproc_per_node 2 -m evar.distill --teacher builtin:digits --student pruned/ --out distilled/
"""
import sys

from evar.cli import main

if __name__ == "__main__":
    sys.argv[1:1] = ["distill"]
    main()
