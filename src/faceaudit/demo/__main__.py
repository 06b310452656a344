import sys

from faceaudit.demo.run import main

sys.exit(main())
