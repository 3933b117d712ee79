"""`python -m evar.dd ARGS` ≡ `evar dd ARGS`; the form torchrun launches:

    torchrun --nproc_per_node 2 -m evar.dd pairs --teacher builtin:digits --samples 20000 --out runs/pairs
"""
from evar.dd.commands import app
from evar.errors import run_cli

if __name__ == "__main__":
    run_cli(app)
