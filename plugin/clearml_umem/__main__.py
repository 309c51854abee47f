import sys

from clearml_umem.cli import main

sys.exit(main())
