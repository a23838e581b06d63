"""`python -m evotok_cli ...` (what torchrun and accelerate launch).

Layer 7, face: may import every layer.
"""

from evotok_cli.cli.app import main

if __name__ == "__main__":
    main()
