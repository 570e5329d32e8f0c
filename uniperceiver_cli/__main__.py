"""`python -m uniperceiver_cli` (and `torchrun -m uniperceiver_cli`) entry point."""

from uniperceiver_cli.cli.app import main

if __name__ == "__main__":
    main()
