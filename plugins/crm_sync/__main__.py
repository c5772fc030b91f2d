import sys

from crm_sync.cli import main

sys.exit(main())
