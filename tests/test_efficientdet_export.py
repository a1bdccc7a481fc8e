"""EfficientDet-Lite0 exported with Detectron2's tracing (TracingAdapter): a TorchScript module and an
ONNX graph of the whole detector that reproduce the eager detections (a separate file: the ONNX export of
the ~4000-node graph alone takes ~40 s on the 2-core CPU).
"""
import io
import warnings

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from conftest import tiny_batch
from libraghm import add_libraghm_config
from libraghm.modeling import apply_efficientdet_preset


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def export_model():
    """Lite0 with its ImageNet backbone and a head whose scores are spread out (no near-ties)."""
    torch.manual_seed(0)
    cfg = add_libraghm_config(get_cfg())
    cfg.MODEL.META_ARCHITECTURE = "EfficientDet"
    cfg.MODEL.EFFICIENTDET.PRESET = "Lite0"
    cfg.MODEL.RETINANET.NUM_CLASSES = 5
    cfg.MODEL.DEVICE = "cpu"
    apply_efficientdet_preset(cfg)
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.2
    model = build_model(cfg).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.head.class_net.predictor.pointwise.weight, std=0.3)
        torch.nn.init.normal_(model.head.box_net.predictor.pointwise.weight, std=0.05)
    image = tiny_batch(1, 160, 224)[0]["image"].float()
    return model, image


def _assert_same_detections(got, eager, atol):
    boxes, classes, scores = got[:3]
    assert boxes.shape == eager.pred_boxes.tensor.shape and len(eager) > 0
    torch.testing.assert_close(torch.as_tensor(boxes), eager.pred_boxes.tensor, atol=atol, rtol=0)
    torch.testing.assert_close(torch.as_tensor(scores), eager.scores, atol=atol, rtol=0)
    assert torch.equal(torch.as_tensor(classes), eager.pred_classes)


def test_torchscript_and_onnx_exports_reproduce_eager(export_model):
    """Detectron2's tracing export (TracingAdapter): a TorchScript module and an ONNX graph of the
    whole detector (pre-processing, anchors, decoding, NMS), run by torch and by onnxruntime."""
    from detectron2.export import TracingAdapter

    model, image = export_model
    adapter = TracingAdapter(model, [{"image": image}]).eval()
    with torch.no_grad():
        eager = model([{"image": image}])[0]["instances"]
        _assert_same_detections(adapter(*adapter.flattened_inputs), eager, atol=0)
    # flattened outputs: the Instances' fields in this order, then the image size
    assert adapter.outputs_schema.schemas[0].schemas[0].keys == ["pred_boxes", "pred_classes", "scores"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)  # checked below
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        f = io.BytesIO()
        torch.onnx.export(adapter, adapter.flattened_inputs, f, opset_version=17,
                          input_names=["image"], dynamic_axes={"image": {1: "h", 2: "w"}},
                          do_constant_folding=False)  # a quarter faster to export
    model.eval()
    with torch.no_grad():
        _assert_same_detections(loaded(image), eager, atol=1e-4)
    import onnxruntime as ort

    session = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    got = [torch.from_numpy(x) for x in session.run(None, {"image": image.numpy()})]
    _assert_same_detections(got, eager, atol=1e-3)
    other = tiny_batch(1, 192, 160, seed=5)[0]["image"].float()  # another image and size
    with torch.no_grad():
        eager_other = model([{"image": other}])[0]["instances"]
        _assert_same_detections(loaded(other), eager_other, atol=1e-4)
    got = [torch.from_numpy(x) for x in session.run(None, {"image": other.numpy()})]
    _assert_same_detections(got, eager_other, atol=1e-3)


def test_scripting_with_instances(export_model):
    from detectron2.export import scripting_with_instances
    from detectron2.modeling.postprocessing import detector_postprocess
    from detectron2.structures import Boxes
    from detectron2.utils.testing import convert_scripted_instances

    model, image = export_model
    scripted = scripting_with_instances(
        model, {"pred_boxes": Boxes, "scores": torch.Tensor, "pred_classes": torch.Tensor})
    with torch.no_grad():
        # a scripted model returns the Instances before Detectron2's postprocessing
        got = convert_scripted_instances(scripted([{"image": image}])[0])
        got = detector_postprocess(got, image.shape[1], image.shape[2])
        eager = model([{"image": image}])[0]["instances"]
    _assert_same_detections([got.pred_boxes.tensor, got.pred_classes, got.scores], eager, atol=1e-5)
