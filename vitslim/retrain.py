"""`python -m vitslim.retrain`: the command is vitslim.cli.retrain (this module only runs it)."""
from vitslim.cli.common import run
from vitslim.cli.retrain import main

if __name__ == "__main__":
    run(main)
