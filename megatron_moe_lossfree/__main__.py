import sys

from megatron_moe_lossfree.cli import main

if __name__ == "__main__":
    sys.exit(main())
