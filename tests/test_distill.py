"""Distillation: the loss definitions, and training runs whose teacher stays untouched."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import xcit.tasks.classification as classification
from conftest import tiny_run_config
from xcit.config import load_config
from xcit.tasks import run
from xcit.tasks.distill import DistillationLoss, Renormalize


class _Teacher(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        self.bn(torch.randn(8, 4))  # would move running statistics if the teacher were in train mode
        return self.logits


def _task(out, y):
    return F.cross_entropy(out, y)


def test_loss_definitions():
    torch.manual_seed(0)
    student, teacher_logits = torch.randn(4, 10), torch.randn(4, 10)
    targets = torch.tensor([1, 2, 3, 4])
    x = torch.zeros(4, 3, 8, 8)
    task = _task(student, targets)
    hard = DistillationLoss(_task, _Teacher(teacher_logits), 'hard', alpha=0.5)(x, student, targets)
    assert torch.allclose(hard, 0.5 * task + 0.5 * F.cross_entropy(student, teacher_logits.argmax(1)))
    tau = 2.0
    soft = DistillationLoss(_task, _Teacher(teacher_logits), 'soft', alpha=0.5, tau=tau)(x, student, targets)
    p_t = F.softmax(teacher_logits / tau, 1)
    kl_sum = (p_t * (p_t.log() - F.log_softmax(student / tau, 1))).sum()
    assert torch.allclose(soft, 0.5 * task + 0.5 * kl_sum * tau ** 2 / student.numel(), atol=1e-6)  # DeiT's scale
    dml = DistillationLoss(_task, _Teacher(teacher_logits), 'dml', alpha=0.5)(x, student, targets)
    p_s = F.softmax(student, 1)
    p_t = F.softmax(teacher_logits, 1)
    symmetric = ((p_t * (p_t / p_s).log()).sum(1).mean() + (p_s * (p_s / p_t).log()).sum(1).mean()) / 2
    assert torch.allclose(dml, 0.5 * task + 0.5 * symmetric, atol=1e-6)
    with pytest.raises(ValueError, match='distill.type'):
        DistillationLoss(_task, _Teacher(teacher_logits), 'feature')


def test_teacher_stays_in_eval_mode():
    teacher = _Teacher(torch.zeros(2, 3))
    loss = DistillationLoss(_task, teacher, 'hard')
    loss.train()
    assert not teacher.training
    loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, requires_grad=True), torch.tensor([0, 1]))
    assert torch.equal(teacher.bn.running_mean, torch.zeros(4))


def test_renormalisation_maps_student_inputs_to_teacher_statistics():
    pixels = torch.rand(2, 3, 4, 4)
    s_mean, s_std, t_mean, t_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    as_student = (pixels - torch.tensor(s_mean).view(1, 3, 1, 1)) / torch.tensor(s_std).view(1, 3, 1, 1)
    as_teacher = (pixels - torch.tensor(t_mean).view(1, 3, 1, 1)) / torch.tensor(t_std).view(1, 3, 1, 1)
    assert torch.allclose(Renormalize(s_mean, s_std, t_mean, t_std)(as_student), as_teacher, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('kind,teacher', [
    ('hard', 'xcit_nano_12_p16_224'),  # a registered model
    ('soft', 'xcit_nano_12_p16_224'),
    ('dml', 'resnet10t'),  # any timm model
])
def test_distillation_run_trains_and_leaves_the_teacher_untouched(tmp_path, monkeypatch, kind, teacher):
    built = {}
    real_build = classification.build_teacher

    def recording_build(config, num_classes):
        model = real_build(config, num_classes)
        built['model'] = model
        built['before'] = {k: v.clone() for k, v in model.state_dict().items()}
        return model

    monkeypatch.setattr(classification, 'build_teacher', recording_build)
    teacher_kwargs = {'depth': 1} if teacher.startswith('xcit') else {}
    config = tiny_run_config(tmp_path, **{'distill.type': kind, 'distill.teacher': teacher,
                                          'distill.teacher_kwargs': teacher_kwargs, 'distill.tau': 2.0})
    result = run(load_config(config))
    losses = [row['train_loss'] for row in result.history]
    assert losses[-1] < losses[0]
    after = built['model'].state_dict()
    assert all(torch.equal(built['before'][k], after[k]) for k in after)
    assert not built['model'].training and not any(p.requires_grad for p in built['model'].parameters())
    saved = torch.load(result.run_dir / 'last.pth', weights_only=True)['model']
    assert set(saved) == set(result.model.state_dict())  # checkpoints hold the student only
