"""bdh: the Dragon Hatchling (BDH-GPU) language model: train, run, compare and look inside."""

from bdh.checkpoint import load_model, save_model
from bdh.config import BDHConfig
from bdh.errors import UserError
from bdh.generate import generate
from bdh.model import BDH
from bdh.protocol import LanguageModel, ModelOutput
from bdh.rundir import RunDir
from bdh.state import BDHState

__all__ = ["BDH", "BDHConfig", "BDHState", "LanguageModel", "ModelOutput", "RunDir", "UserError", "generate",
           "load_model", "save_model"]
__version__ = "0.1.0"
