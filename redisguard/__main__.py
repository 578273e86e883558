import sys

from redisguard.cli.main import main

sys.exit(main())
