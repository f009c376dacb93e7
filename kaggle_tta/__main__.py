import sys

from kaggle_tta.cli import main

sys.exit(main())
