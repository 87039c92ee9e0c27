"""`python -m vitslim.export`: the command is vitslim.cli.export (this module only runs it)."""
from vitslim.cli.common import run
from vitslim.cli.export import main

if __name__ == "__main__":
    run(main)
