"""The installed nova-swarm version, carried in announces and hub status."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nova-swarm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
