"""Run fastgrok from a checkout without installing: `python cli.py --help`."""

from fastgrok.cli import app

if __name__ == "__main__":
    app()
