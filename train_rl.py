"""train_rl.py: not written yet (see the open issues)."""
import sys

if __name__ == "__main__":
    sys.exit("train_rl.py is not implemented yet")
