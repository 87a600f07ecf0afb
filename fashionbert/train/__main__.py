"""`python -m fashionbert.train` (and `torchrun -m fashionbert.train`): the training stage alone."""
import sys

from fashionbert.train.trainer import main

sys.exit(main())
