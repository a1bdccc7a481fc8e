"""The model zoo: configs by name, release files, the libraghm:// prefix, and MODEL_ZOO.md's table."""
import hashlib
import json
import os
import re
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model

import train_net
from conftest import CONFIGS, REPO, get_config, tiny_train_opts
from libraghm import model_zoo
from libraghm.model_zoo.release import file_hash, release_checkpoint

sys.path.insert(0, os.path.join(REPO, "tools"))
import build_model_zoo  # noqa: E402

LIBRA = "Shapes-Detection/libra_faster_rcnn.yaml"


def test_config_files_by_name():
    assert model_zoo.get_config_file(LIBRA) == os.path.join(CONFIGS, LIBRA)
    assert model_zoo.get_config_file("Shapes-Detection/libra_faster_rcnn") == os.path.join(CONFIGS, LIBRA)
    cfg = model_zoo.get_config("COCO-Detection/libra_faster_rcnn_R_50_FPN_1x.yaml")
    assert cfg.MODEL.ROI_HEADS.NAME == "LibraROIHeads"
    assert cfg.LIBRAGHM.ROI_SAMPLER.NAME == "IoUBalancedSampler"
    with pytest.raises(RuntimeError, match="'Shapes-Detection/nope.yaml' is not a LibraGHM config"):
        model_zoo.get_config_file("Shapes-Detection/nope.yaml")
    with pytest.raises(RuntimeError, match="has no released checkpoint"):
        model_zoo.get_checkpoint_url("COCO-Detection/libra_faster_rcnn_R_50_FPN_1x.yaml")


def test_rows_cover_every_shapes_config():
    shapes = sorted(
        "Shapes-Detection/" + f for f in os.listdir(os.path.join(CONFIGS, "Shapes-Detection"))
        if not f.startswith("Base-")
    )
    assert sorted(n for n, _ in build_model_zoo.ROWS) == shapes
    for name, baseline in build_model_zoo.ROWS:
        assert baseline is None or dict(build_model_zoo.ROWS)[baseline] is None, name


def test_released_libra_model_loads_and_matches_its_file():
    """The committed release: hash in the name, weights only, loaded by get(trained=True)."""
    url = model_zoo.get_checkpoint_url(LIBRA)
    m = re.fullmatch(r"libraghm://Shapes-Detection/libra_faster_rcnn/model_final_([0-9a-f]{8})\.pth", url)
    assert m, url
    local = os.path.join(REPO, "model_zoo", url[len("libraghm://"):])
    assert hashlib.sha256(open(local, "rb").read()).hexdigest()[:8] == m.group(1)
    state = torch.load(local, map_location="cpu")
    assert set(state) == {"model", "__author__"}
    model = model_zoo.get(LIBRA, trained=True, device="cpu")
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    # its metrics and MODEL_ZOO.md agree
    metrics = json.load(open(os.path.join(os.path.dirname(local), "metrics.json")))
    assert abs(metrics["bbox"]["AP"] - metrics["bbox_at_end_of_training"]["AP"]) <= 0.05
    row = [r for r in open(os.path.join(REPO, "MODEL_ZOO.md")) if r.startswith("| [libra_faster_rcnn]")]
    assert len(row) == 1 and f"| {metrics['bbox']['AP']:.1f} |" in row[0] and m.group(1) in row[0]


def test_model_zoo_table_matches_committed_metrics():
    text = open(os.path.join(REPO, "MODEL_ZOO.md")).read()
    for name, baseline in build_model_zoo.ROWS:
        m = build_model_zoo.load_metrics(name)
        if m is None:
            continue
        row = [r for r in text.splitlines() if r.startswith(f"| [{build_model_zoo._stem(name)}](")]
        assert len(row) == 1, name
        cells = [c.strip() for c in row[0].split("|")]
        assert float(cells[6]) == round(m["bbox"]["AP"], 1), name
        base = build_model_zoo.load_metrics(baseline) if baseline else None
        if base is not None:
            assert float(cells[7]) == pytest.approx(m["bbox"]["AP"] - base["bbox"]["AP"], abs=0.051)


def test_missing_release_file_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LIBRAGHM_MODEL_ZOO", str(tmp_path))
    model = build_model(get_config(LIBRA))
    with pytest.raises(FileNotFoundError, match="build_model_zoo.py --only Shapes-Detection/libra_faster_rcnn"):
        DetectionCheckpointer(model).load(model_zoo.get_checkpoint_url(LIBRA))


def test_release_of_a_training_output_evaluates_back_to_the_same_ap(tmp_path, monkeypatch):
    """Train briefly, release, then train_net --eval-only on the release file reproduces the AP."""
    cfg_file = os.path.join(CONFIGS, LIBRA)
    out = tmp_path / "train"
    args = default_argument_parser().parse_args(["--config-file", cfg_file, *tiny_train_opts(out, 30)])
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    evals = [json.loads(line) for line in open(out / "metrics.json") if "bbox/AP" in line]
    trained_ap = evals[-1]["bbox/AP"]  # COCOEvaluator at the end of training

    zoo = tmp_path / "zoo"
    release = release_checkpoint(str(out / "model_final.pth"), str(out / "config.yaml"), str(zoo / "mine"))
    assert os.path.basename(release) == f"model_final_{file_hash(release)}.pth"
    assert set(torch.load(release, map_location="cpu")) == {"model", "__author__"}
    released_cfg = open(zoo / "mine" / "config.yaml").read()
    assert "WEIGHTS: ''" in released_cfg and str(out) not in released_cfg

    monkeypatch.setenv("LIBRAGHM_MODEL_ZOO", str(zoo))
    eval_args = default_argument_parser().parse_args([
        "--config-file", str(zoo / "mine" / "config.yaml"), "--eval-only",
        "MODEL.WEIGHTS", "libraghm://mine/" + os.path.basename(release), "OUTPUT_DIR", str(tmp_path / "eval"),
    ])
    res = train_net.main(eval_args)
    assert res["bbox"]["AP"] == pytest.approx(trained_ap, abs=1e-6)
    # not only the AP: the very same detections, box for box
    before = json.load(open(out / "inference" / "shapes_val_mini" / "coco_instances_results.json"))
    after = json.load(open(tmp_path / "eval" / "inference" / "shapes_val_mini" / "coco_instances_results.json"))
    assert len(before) > 0 and len(after) == len(before)
    for a, b in zip(before, after):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3) and a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_parse_evaluation_reads_detectron2_log():
    log = "\n".join([
        "[11/23 05:20:01 d2.evaluation.evaluator]: Total inference pure compute time: 0:00:22 (0.074700 s / iter per device, on 1 devices)",
        "[11/23 05:20:03 d2.evaluation.testing]: copypaste: Task: bbox",
        "[11/23 05:20:03 d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl",
        "[11/23 05:20:03 d2.evaluation.testing]: copypaste: 53.9094,74.1038,63.6988,51.6551,58.7495,50.0361",
    ])
    ap, sec = build_model_zoo.parse_evaluation(log)
    assert ap == {"AP": 53.9094, "AP50": 74.1038, "AP75": 63.6988, "APs": 51.6551, "APm": 58.7495, "APl": 50.0361}
    assert sec == 0.0747
