"""`python -m vitslim.search`: the command is vitslim.cli.search (this module only runs it)."""
from vitslim.cli.common import run
from vitslim.cli.search import main

if __name__ == "__main__":
    run(main)
