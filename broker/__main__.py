import sys

from nova_swarm.broker.server.cli import main

sys.exit(main())
