"""`python -m rahf.data <command>`: the same as `rahf data <command>`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
