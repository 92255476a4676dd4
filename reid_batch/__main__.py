import sys

from reid_batch.cli import main

sys.exit(main())
