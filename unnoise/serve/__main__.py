"""``python -m unnoise.serve [flags]`` runs ``unnoise serve [flags]``."""

from unnoise.serve.cli import main

main()
