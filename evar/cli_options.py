"""Command-line options shared by `evar`, `evar-export` and `evar-bench` (one definition, one help text).

torch-free, so the runtime's `evar-bench` can use it on a machine without PyTorch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="builtin:digits | official:dNN | random:dNN|digits | "
                                                             "model directory")]
VarCkpt = Annotated[Optional[Path], typer.Option(help="official VAR .pth (only with --model official:dNN)")]
VaeCkpt = Annotated[Optional[Path], typer.Option(help="official VQVAE .pth (only with --model official:dNN)")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace an existing output, if EVAR wrote it (a model "
                                                             "directory, artifact, report or plot); never a folder "
                                                             "or file of yours")]
Guidance = Annotated[float, typer.Option("--cfg", help="classifier-free guidance w: (1+w)·cond − w·uncond (VAR ramps "
                                                       "it linearly from 0 to w over the scales; a DiT's paper "
                                                       "scale is 1+w)")]
TopK = Annotated[int, typer.Option(help="keep the k most likely tokens (0 = off)")]
TopP = Annotated[float, typer.Option(help="nucleus sampling mass (0 = off)")]
Seed = Annotated[int, typer.Option(help="same seed, same tokens, on every backend")]
VerifyHashes = Annotated[bool, typer.Option("--verify-hashes", help="check every artifact file's sha256 against "
                                                                    "the manifest before loading")]


def command_line(tool: str) -> str:
    """How this process was invoked, for provenance ("evar-export onnx --model …")."""
    import shlex
    import sys

    return tool + " " + " ".join(shlex.quote(a) for a in sys.argv[1:])
