import sys

from sniport.cli import main

sys.exit(main())
