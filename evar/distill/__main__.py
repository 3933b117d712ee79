"""`python -m evar.distill ARGS` ≡ `evar distill ARGS`; the form torchrun launches:

    torchrun --nproc_per_node 2 -m evar.distill --teacher builtin:digits --student pruned/ --out distilled/
"""
import typer

from evar.distill.command import distill
from evar.errors import run_cli

if __name__ == "__main__":
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(distill)
    run_cli(app)
