"""``python -m pml_plugins`` is the ``pml-plugins`` command line (so ``torchrun -m pml_plugins`` works)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
