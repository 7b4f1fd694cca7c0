"""`python -m fastgrok`: the command line, as launchers that start a module run it (`torchrun -m fastgrok`)."""

from fastgrok.cli import app

if __name__ == "__main__":
    app(prog_name="fastgrok")
