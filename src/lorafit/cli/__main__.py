from lorafit.cli import run

run()
