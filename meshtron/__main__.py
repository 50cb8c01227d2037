"""`python -m meshtron ...` (what `torchrun -m meshtron train ...` runs)."""

from meshtron.cli import main

if __name__ == "__main__":
    main()
