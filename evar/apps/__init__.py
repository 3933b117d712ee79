"""The command-line apps at the top of EVAR: `evar` (cli.py) and its main job, `evar demo` (demo.py).

The only modules that reach into every layer (models and compression, export, runtime); nothing imports
them. `evar-export` and `evar-bench` live with their layers (`evar.export.cli`, `evar.runtime.bench`).
"""
