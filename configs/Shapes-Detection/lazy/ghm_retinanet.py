"""
GHM RetinaNet on the built-in shapes dataset, as a LazyConfig: the Python version of
../ghm_retinanet.yaml (same model, data, schedule; its parts are passed as objects).

RetinaNet (small ResNet + FPN, P3-P7) trained with the gradient harmonizing losses, paper
defaults: GHM-C for classification (30 bins, momentum 0.75) and GHM-R for box regression
(mu 0.02, 10 bins, momentum 0.7, weight 10), and the norm of all gradients together clipped to 35
before every step (LIBRAGHM.CLIP_GRAD_NORM), as the paper's recipe.

    python tools/lazyconfig_train_net.py --config-file configs/Shapes-Detection/lazy/ghm_retinanet.py
"""
from detectron2.config import LazyCall as L

from libraghm.losses import GHMC, GHMR
from libraghm.modeling import LibraGHMRetinaNet

from .common import dataloader, lr_multiplier, optimizer, retinanet, train

model = retinanet()  # the stock model of the yaml config's _BASE_

model._target_ = LibraGHMRetinaNet
# bias_correction as ../ghm_retinanet.yaml (its released model was trained so; the paper has none)
model.cls_loss = L(GHMC)(bins=30, momentum=0.75, loss_weight=1.0, bias_correction=True)
model.box_reg_loss = L(GHMR)(mu=0.02, bins=10, momentum=0.7, loss_weight=10.0, bias_correction=True)
model.log_period = 20  # LIBRAGHM.LOG_PERIOD: gradient-norm histograms, GHM's weights

optimizer.max_norm = 35.0
optimizer.optimizer.lr = 0.01
train.output_dir = "./output/lazy/ghm_retinanet"
