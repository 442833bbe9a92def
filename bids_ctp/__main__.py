"""``python -m bids_ctp`` runs the bids_ctp command."""
import sys

from bids_ctp.cli.run import main

if __name__ == "__main__":
    sys.exit(main())
