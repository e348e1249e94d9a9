"""`python -m bridge ...`: the same commands as the `analytics-bridge` console script."""

from bridge.cli._entry import main

if __name__ == "__main__":
    main()
