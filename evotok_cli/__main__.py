"""`python -m evotok_cli ...` (what torchrun and accelerate launch)."""

from evotok_cli.cli import main

if __name__ == "__main__":
    main()
