"""``python -m bridge.demo``: the demo of ``nox -s demo``."""

from bridge.demo import main

if __name__ == "__main__":
    main(prog_name="python -m bridge.demo")
