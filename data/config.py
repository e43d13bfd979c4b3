"""S3FD configuration.

Users of the original repository edit this file (dataset paths in particular), so every
value lives here under its familiar name. Sizes are pixels at the training resolution,
colours are RGB.
"""
import os

from easydict import EasyDict

_C = EasyDict()
cfg = _C

# -- network input ---------------------------------------------------------------------
_C.INPUT_SIZE = 640
_C.resize_width = 640
_C.resize_height = 640
# Per-channel mean subtracted from the RGB input; no scaling afterwards.
_C.img_mean = (123.0, 117.0, 104.0)
# 'reference': dilated fc6 of vgg16_reducedfc.pth; 'caffe': the released Caffe fc6
# (3x3, pad 3, no dilation).
MODEL_VARIANTS = ('reference', 'caffe')
_C.MODEL_VARIANT = 'reference'
# Smallest input side the network accepts: the five poolings of VGG (floor, floor, ceil, floor,
# floor halvings) take 28 to 14, 7, 4, 2, 1 and 27 to 13, 6, 3, 1, 0.
MIN_INPUT_SIDE = 28

# -- anchors ------------------------------------------------------------------------------
# Feature-map sizes at 640x640; the network always uses the real sizes of its input.
_C.FEATURE_MAPS = [160, 80, 40, 20, 10, 5]
_C.STEPS = [4, 8, 16, 32, 64, 128]
_C.ANCHOR_SIZES = [16, 32, 64, 128, 256, 512]
_C.CLIP = False
_C.VARIANCE = [0.1, 0.2]

# -- detection (test phase) ---------------------------------------------------------------
_C.NUM_CLASSES = 2
_C.CONF_THRESH = 0.05
_C.NMS_TOP_K = 5000
_C.NMS_THRESH = 0.3
_C.TOP_K = 750
_C.USE_NMS = True

# -- loss -----------------------------------------------------------------------------------
_C.NEG_POS_RATIOS = 3
# Stage 2 of anchor matching (scale compensation): 'image' is the established PyTorch
# port's per-image rule (the default), 'face' the per-face rule of the S3FD paper.
_C.SCALE_COMPENSATION = 'image'

# -- training schedule --------------------------------------------------------------------
_C.LR_STEPS = (80000, 100000, 120000)
_C.MAX_STEPS = 150000
_C.EPOCHES = 300
_C.SAVE_INTERVAL = 5000
_C.LOG_INTERVAL = 10

# -- augmentation ---------------------------------------------------------------------------
_C.apply_distort = True
_C.brightness_prob = 0.5
_C.brightness_delta = 0.125
_C.contrast_prob = 0.5
_C.contrast_delta = 0.5
_C.saturation_prob = 0.5
_C.saturation_delta = 0.5
_C.hue_prob = 0.5
_C.hue_delta = 18.0
_C.anchor_sampling = True
_C.data_anchor_sampling_prob = 0.5
_C.sampling_trials = 50
_C.min_face_size = 6.0
_C.filter_min_face = True
_C.mirror_prob = 0.5
# Resize interpolations drawn at random for each training sample (OpenCV names; add
# 'lanczos' for the reference's fifth method at about twice the per-sample cost).
_C.resize_interpolations = ('linear', 'cubic', 'area', 'nearest')
# SSD square samplers as (min scale, max scale) of the image's short side.
_C.ssd_sampler_scales = ((1.0, 1.0),) + ((0.3, 1.0),) * 5
# Data-anchor-sampling accepts a window holding a whole face or overlapping one above this IoU.
_C.das_accept_iou = 0.7
# A training sample whose augmentation kept no face is drawn again this many times before a
# deterministic crop around its largest face is used.
_C.resample_attempts = 10
# Unreadable training images are replaced; give up after this many unreadable replacements.
_C.replacement_tries = 100

# -- face dataset -----------------------------------------------------------------------
_C.FACE = EasyDict()
_C.FACE.TRAIN_FILE = './data/face_train.txt'
_C.FACE.VAL_FILE = './data/face_val.txt'
_C.FACE.WIDER_DIR = os.environ.get('WIDER_DIR', './data/WIDER')
_C.FACE.OVERLAP_THRESH = [0.1, 0.35, 0.5]
