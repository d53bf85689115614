"""Built-in client plugins, one module each; importing this package registers them all in ``PLUGINS``.

Each module holds a technique's functional form and its plugin class. A new plugin module must be
imported here. The modules import :mod:`fedsim.clients.plugin_api`, which never imports this
package, so there is no import cycle.
"""

from fedsim.clients.plugins.adaptive_batch import AdaptiveBatch
from fedsim.clients.plugins.adversarial import Adversarial
from fedsim.clients.plugins.barlow_twins import BarlowTwins
from fedsim.clients.plugins.cockpit import Cockpit
from fedsim.clients.plugins.conadv import ConAdv
from fedsim.clients.plugins.distill import Distill
from fedsim.clients.plugins.data_diet import DataDiet
from fedsim.clients.plugins.dp_sgd import DPSGD, preflight
from fedsim.clients.plugins.fedld_margin import FedLDMargin, margin_penalty
from fedsim.clients.plugins.fedprox import FedProx
from fedsim.clients.plugins.gb_nn import GBNN
from fedsim.clients.plugins.gi_loss import GILoss
from fedsim.clients.plugins.grad_spectrum import GradSpectrum
from fedsim.clients.plugins.ghost_bn import GhostBN
from fedsim.clients.plugins.grad_norm_sampling import GradNormSampling
from fedsim.clients.plugins.hard_batches import HardBatches
from fedsim.clients.plugins.hessian_top import HessianTop
from fedsim.clients.plugins.microbatch import MicroBatch
from fedsim.clients.plugins.mixtrain import MixTrain
from fedsim.clients.plugins.scalecom import ScaleCom
from fedsim.clients.plugins.slca import SLCA
from fedsim.clients.plugins.reste import ReSTE
from fedsim.clients.plugins.step import Step
from fedsim.clients.plugins.tract import TrAct

__all__ = ["GBNN", "ReSTE", "ScaleCom", "TrAct", "Cockpit", "GradSpectrum", "HessianTop", "DataDiet", "GhostBN", "GradNormSampling", "HardBatches", "MicroBatch", "AdaptiveBatch", "Adversarial", "BarlowTwins", "ConAdv", "GILoss", "Distill", "MixTrain", "SLCA", "Step", "DPSGD", "FedLDMargin", "FedProx", "margin_penalty", "preflight"]
