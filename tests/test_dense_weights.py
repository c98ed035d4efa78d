"""Backbone weights for the dense models from classification checkpoints (official layout, PASSL, ours) and from
another dense model, with a report of what was skipped; weights of another size are refused."""
import logging

import pytest
import torch

import xcit
from xcit.checkpoints import CheckpointError, save_state_dict
from xcit.dense import load_backbone_weights


@pytest.fixture(scope='module')
def classifier():
    torch.manual_seed(0)
    return xcit.create_model('xcit_nano_12_p16_224', num_classes=10)


def _assert_backbone_equals_classifier(backbone, classifier):
    theirs = classifier.state_dict()
    for key, value in backbone.state_dict().items():
        if not key.startswith('fpn'):
            assert torch.equal(value, theirs[key]), key


@pytest.mark.parametrize('fmt', ['official', 'passl', 'safetensors'])
def test_a_classification_checkpoint_loads_and_the_report_names_the_skipped_parts(tmp_path, classifier, fmt, caplog):
    path = tmp_path / f'weights.{"pdparams" if fmt == "passl" else fmt if fmt == "safetensors" else "pth"}'
    adapter = xcit.registry.get_checkpoint_adapter(classifier)
    save_state_dict(classifier.state_dict(), path, fmt, model_name='xcit_nano_12_p16_224', passl_fn=adapter.passl_fn)
    backbone = xcit.create_model('xcit_nano_12_p16_224', features_only=True)
    with caplog.at_level(logging.INFO, logger='xcit.dense.weights'):
        report = load_backbone_weights(backbone, path)
    _assert_backbone_equals_classifier(backbone, classifier)
    skipped = ' '.join(report.skipped)
    assert 'cls_token' in skipped and 'cls_attn_blocks.0.' in skipped and 'head.weight' in skipped
    assert not any(k.startswith('blocks.') for k in report.skipped)  # every XCA block found its place
    assert all(k.startswith('fpn') for k in report.initialised) and report.initialised
    line = caplog.records[-1].getMessage()
    assert 'cls_attn_blocks.* (' in line and 'head.*' in line and 'kept their initialisation: fpn1.*' in line


def test_through_the_registered_name_and_from_a_detectors_checkpoint(tmp_path, classifier):
    path = tmp_path / 'cls.pth'
    torch.save({'model': classifier.state_dict()}, path)
    detector = xcit.create_model('maskrcnn_xcit_nano_12_p16', num_classes=3, backbone_checkpoint=str(path))
    _assert_backbone_equals_classifier(detector.backbone.body, classifier)
    torch.save({'model': detector.state_dict()}, tmp_path / 'det.pth')
    segmenter = xcit.create_model('semfpn_xcit_nano_12_p16', num_classes=3)
    report = load_backbone_weights(segmenter.backbone, tmp_path / 'det.pth')
    assert not report.skipped and not report.initialised  # the detector's backbone, adapters and all
    for ours, theirs in zip(segmenter.backbone.state_dict().values(), detector.backbone.body.state_dict().values()):
        assert torch.equal(ours, theirs)


def test_weights_of_another_size_are_refused(tmp_path, classifier):
    torch.save(classifier.state_dict(), tmp_path / 'nano.pth')
    backbone = xcit.create_model('xcit_tiny_12_p16_224', features_only=True)
    with pytest.raises(CheckpointError, match='does not fit'):
        load_backbone_weights(backbone, tmp_path / 'nano.pth')

