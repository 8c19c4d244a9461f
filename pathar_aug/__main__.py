"""``python -m pathar_aug``: the command line, also as torchrun starts it (``torchrun -m pathar_aug``)."""
from pathar_aug.cli import main

if __name__ == "__main__":
    main()
