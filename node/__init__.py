"""The node: runs a model in-process and answers the tasks the hub sends it."""

from .agent import Node
from .config import NodeConfig
from .engine import Engine, EngineInfo, Generation, Sampling, load_engine
from .fake import FakeEngine

__all__ = ["Engine", "EngineInfo", "FakeEngine", "Generation", "Node", "NodeConfig", "Sampling", "load_engine"]
