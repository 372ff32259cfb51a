"""``python -m gntdma.xenstored --socket PATH``: run the daemon (see ``_daemon``)."""

import sys

from gntdma.xenstored._daemon import main

sys.exit(main())
