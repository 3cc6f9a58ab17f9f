"""`python -m dicomai` is the `dicomai` command."""

from dicomai.cli.main import main

main()
