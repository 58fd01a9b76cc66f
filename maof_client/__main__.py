"""`python -m maof_client`: the `maof` command line."""

from maof_client.cli import main

main()
