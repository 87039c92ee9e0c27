"""`python -m vitslim.plan`: the command is vitslim.cli.plan (this module only runs it)."""
from vitslim.cli.common import run
from vitslim.cli.plan import main

run(main)
