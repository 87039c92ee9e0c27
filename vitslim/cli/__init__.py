"""The command line, on top of the library: nothing in vitslim imports this package.

common: running a command (one-line errors, exit codes), argument types, shared flags, the start of a run.
search, retrain, plan, export: one module per command; `python -m vitslim.search|retrain|plan|export` run them.
"""
