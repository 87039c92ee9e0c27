from vitslim import cli
from vitslim.plan.command import main

cli.run(main)
