import sys

from faceaudit.report.build import main

sys.exit(main())
