"""LibraGHM data: the built-in shapes dataset and COCO-format dataset registration."""
from .shapes import SHAPES_CATEGORIES, SHAPES_SPLITS, ensure_shapes, generate_shapes, shapes_root
from .register import check_coco_dataset, prepare_datasets, register_coco_dataset, register_shapes

register_shapes()
