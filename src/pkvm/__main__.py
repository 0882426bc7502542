"""`python -m pkvm`: the `pkvm` command line."""

from pkvm.cli.main import main

if __name__ == "__main__":
    main()
