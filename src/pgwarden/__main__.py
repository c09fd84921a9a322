"""``python -m pgwarden``: the same command line as ``pgwarden``."""

from pgwarden.cli import main

if __name__ == "__main__":
    main()
