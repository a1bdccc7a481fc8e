"""The class names of LibraGHM 0.1, registered so that a config using one fails at build time
with a message naming the replacement (rather than "no object named ... in registry")."""
from detectron2.modeling import META_ARCH_REGISTRY, PROPOSAL_GENERATOR_REGISTRY, ROI_HEADS_REGISTRY

__all__ = ["RENAMED_CLASSES"]

#: old name -> (registry, what replaces it)
RENAMED_CLASSES = {
    "LibraROIHeads": (ROI_HEADS_REGISTRY, "MODEL.ROI_HEADS.NAME: LibraGHMROIHeads with "
                      "MODEL.ROI_HEADS.SAMPLER (e.g. IoUBalancedSampler)"),
    "OHEMROIHeads": (ROI_HEADS_REGISTRY, "MODEL.ROI_HEADS.NAME: LibraGHMROIHeads with "
                     "MODEL.ROI_HEADS.SAMPLER: OHEMSampler and MODEL.ROI_HEADS.OHEM.MODE"),
    "LibraRPN": (PROPOSAL_GENERATOR_REGISTRY, "MODEL.PROPOSAL_GENERATOR.NAME: LibraGHMRPN with "
                 "MODEL.RPN.SAMPLER"),
    "GHMRPN": (PROPOSAL_GENERATOR_REGISTRY, "MODEL.PROPOSAL_GENERATOR.NAME: LibraGHMRPN with "
               "MODEL.RPN.OBJECTNESS_LOSS_TYPE: ghm_c and MODEL.RPN.SAMPLER: NoSampling"),
    "GHMRetinaNet": (META_ARCH_REGISTRY, "MODEL.META_ARCHITECTURE: LibraGHMRetinaNet with "
                     "MODEL.RETINANET.CLS_LOSS_TYPE: ghm_c and BBOX_REG_LOSS_TYPE: ghm_r"),
}


def _renamed(old, replacement):
    def build(*args, **kwargs):
        raise ValueError(f"{old!r} was replaced in LibraGHM 0.2: use {replacement}.")

    build.__name__ = old
    return build


for _old, (_registry, _replacement) in RENAMED_CLASSES.items():
    _registry._do_register(_old, _renamed(_old, _replacement))
