from .bbox_utils import center_size, decode, encode, jaccard, match, match_batch, point_form
from .functions.detection import Detect
from .functions.prior_box import PriorBox
from .modules.l2norm import L2Norm
from .modules.multibox_loss import MultiBoxLoss

__all__ = ['point_form', 'center_size', 'jaccard', 'encode', 'decode', 'match', 'match_batch',
           'PriorBox', 'Detect', 'L2Norm', 'MultiBoxLoss']
