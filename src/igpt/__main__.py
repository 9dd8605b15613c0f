"""`python -m igpt ...` runs the same CLI as the `igpt` console script."""

from .cli import main

if __name__ == "__main__":
    main()
