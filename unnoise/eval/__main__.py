"""``python -m unnoise.eval [sweep] ...``: ``unnoise eval`` on its own (e.g. ``torchrun -m unnoise.eval ...``)."""

from unnoise.eval.cli import main

if __name__ == "__main__":
    main()
