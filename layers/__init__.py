from .bbox_utils import point_form, center_size, jaccard, encode, decode, match, match_batch
from .functions.prior_box import PriorBox
from .functions.detection import Detect
from .modules.l2norm import L2Norm
from .modules.multibox_loss import MultiBoxLoss
