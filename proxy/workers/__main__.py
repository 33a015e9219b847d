"""`python -m proxy.workers --control-fd FD`: one worker process."""

import sys

from proxy.workers.child import worker_main

sys.exit(worker_main())
