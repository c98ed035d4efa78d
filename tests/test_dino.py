"""DINO's pieces against direct formulations: the loss, the teacher's EMA, multi-crop, the k-NN read-out."""
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import xcit
from xcit.ssl import DINOHead, DINOLoss, DINOModel, MultiCrop, cosine_ramp, knn_predict, teacher_temperature
from xcit.ssl.knn import knn_accuracy


def _direct_dino_loss(student, teacher, center, crops, teacher_temp, student_temp=0.1):
    """The paper's sum over pairs (global view t of the teacher, any other view v of the student), written out
    one sample at a time."""
    B = teacher.shape[0] // 2
    total, pairs = 0.0, 0
    for t in range(2):
        for v in range(crops):
            if v == t:
                continue
            for b in range(B):
                q = torch.softmax((teacher[t * B + b] - center[0]) / teacher_temp, dim=0)
                log_p = torch.log_softmax(student[v * B + b] / student_temp, dim=0)
                total += -(q * log_p).sum().item() / B
            pairs += 1
    return total / pairs


def test_the_loss_is_the_mean_cross_entropy_over_cross_view_pairs_and_the_centre_moves_by_its_ema():
    torch.manual_seed(0)
    crops, B, K = 5, 3, 16
    student, teacher = torch.randn(crops * B, K) * 3, torch.randn(2 * B, K) * 3
    loss = DINOLoss(K, crops, center_momentum=0.9)
    loss.center.copy_(torch.randn(1, K))
    center = loss.center.clone()
    value = loss(student, teacher, teacher_temp=0.04)
    assert value.item() == pytest.approx(_direct_dino_loss(student, teacher, center, crops, 0.04), rel=1e-5)
    # the centre used was the old one; then it moved towards the batch mean of the raw teacher outputs
    assert torch.allclose(loss.center, 0.9 * center + 0.1 * teacher.mean(0, keepdim=True), atol=1e-6)


def test_the_loss_records_the_entropy_of_its_targets_which_reads_ln_k_once_the_teacher_is_uniform():
    crops, B, K = 3, 4, 32
    loss = DINOLoss(K, crops)
    student = torch.randn(crops * B, K)
    loss.center.fill_(0.5)
    loss(student, torch.full((2 * B, K), 0.5), teacher_temp=0.04)  # every output at the centre: uniform targets
    assert loss.teacher_entropy.item() == pytest.approx(math.log(K), rel=1e-6)
    peaked = torch.zeros(2 * B, K)
    peaked[:, 0] = 1.0
    loss.center.zero_()
    loss(student, peaked, teacher_temp=0.04)  # one class 25 temperatures above the rest: next to one-hot
    assert loss.teacher_entropy.item() < 0.01


def test_schedules_follow_dino():
    assert cosine_ramp(0.996, 1.0, 0, 100) == 0.996 and cosine_ramp(0.996, 1.0, 100, 100) == 1.0
    assert cosine_ramp(0.996, 1.0, 50, 100) == pytest.approx(0.998)
    temps = [teacher_temperature(e, 0.04, 0.07, 30) for e in range(32)]
    assert temps[0] == 0.04 and temps[29] == pytest.approx(0.07) and temps[31] == 0.07  # linspace: both ends
    assert temps[15] == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert teacher_temperature(0, 0.04, 0.07, 0) == 0.07


def _tiny_dino(out_dim=32):
    torch.manual_seed(0)
    def multicrop(norm_last_layer=True):
        backbone = xcit.create_model('xcit_nano_12_p8_224', depth=1, num_classes=0)
        return MultiCrop(backbone, DINOHead(backbone.num_features, out_dim, 64, 16, norm_last_layer=norm_last_layer))
    return DINOModel(multicrop(False), multicrop())


def test_the_teacher_gets_no_gradient_and_moves_by_exactly_the_ema_rule():
    model = _tiny_dino()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    student_out, teacher_out = model(crops)
    assert student_out.shape == (6, 32) and teacher_out.shape == (4, 32)  # the teacher sees the global crops only
    (student_out.sum() + teacher_out.sum()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    torch.optim.SGD([p for p in model.student.parameters() if p.requires_grad], lr=0.1).step()
    before = {k: v.clone() for k, v in model.teacher.named_parameters()}
    buffers = {k: v.clone() for k, v in model.teacher.named_buffers()}
    model.update_teacher(0.9)
    student = dict(model.student.named_parameters())
    for name, p in model.teacher.named_parameters():
        expected = before[name] * 0.9 + student[name].detach() * (1 - 0.9)
        torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7, msg=name)  # a fused multiply-add rounds once
    assert all(torch.equal(v, buffers[k]) for k, v in model.teacher.named_buffers())  # BatchNorm stats: its own


def test_crops_of_two_sizes_run_through_one_backbone_without_interpolation(monkeypatch):
    model = _tiny_dino()
    calls = []
    monkeypatch.setattr(F, 'interpolate', lambda *a, **k: calls.append(a) or pytest.fail('interpolated'))
    backbone_inputs = []
    model.student.backbone.register_forward_hook(lambda m, args, out: backbone_inputs.append(args[0].shape))
    crops = [torch.randn(3, 3, 48, 48)] * 2 + [torch.randn(3, 3, 24, 24)] * 4
    out, _ = model(crops)
    assert out.shape == (18, 32) and not calls
    assert backbone_inputs == [(6, 3, 48, 48), (12, 3, 24, 24)]  # one pass per resolution


def test_multicrop_of_several_draws_takes_crop_k_from_draw_k_mod_n():
    from PIL import Image
    from xcit.data.multicrop import MultiCropTransform
    transform = MultiCropTransform(16, 8, local_crops=3, mean=(0, 0, 0), std=(1, 1, 1))
    black, grey = Image.new('RGB', (32, 32)), Image.new('RGB', (32, 32), (100, 100, 100))
    for seed in range(5):  # jitter, solarisation and blur keep black black and grey above it
        torch.manual_seed(seed)
        crops = transform([black, grey])
        assert [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 3
        assert [bool((c > 0).all()) for c in crops] == [False, True, False, True, False]
        assert [bool((c == 0).all()) for c in crops] == [True, False, True, False, True]
        torch.manual_seed(seed)
        assert all(bool((c > 0).all()) for c in transform(grey))  # one image: every crop from it


def test_weighted_knn_matches_a_brute_force_vote():
    g = torch.Generator().manual_seed(0)
    train, labels = torch.randn(40, 8, generator=g), torch.randint(0, 4, (40,), generator=g)
    test = torch.randn(9, 8, generator=g)
    scores = knn_predict(train, labels, test, k=5, temperature=0.07, num_classes=4, chunk=4)
    for i, x in enumerate(test):
        sims = [(F.cosine_similarity(x, t, dim=0).item(), int(c)) for t, c in zip(train, labels)]
        nearest = sorted(sims, reverse=True)[:5]
        expected = [sum(math.exp(s / 0.07) for s, c in nearest if c == cls) for cls in range(4)]
        assert scores[i].tolist() == pytest.approx(expected, rel=1e-4)
    accuracy = knn_accuracy(train, labels, train, labels, k=1)
    assert accuracy == 100.0  # each point is its own nearest neighbour


def test_a_tiny_pretraining_trains_the_student_moves_the_teacher_and_checkpoints_both(tmp_path):
    from conftest import tiny_run_config
    from xcit.config import load_config
    from xcit.tasks import run
    config = tiny_run_config(tmp_path, **{
        'task': 'dino', 'model.kwargs': {'depth': 1}, 'data.dataset': 'digit_views', 'data.digits_size': 24,
        'data.image_size': 24, 'schedule.epochs': 1, 'optim.weight_decay_end': 0.4, 'optim.clip_grad': 3.0,
        'optim.clip_mode': 'per_parameter', 'optim.no_decay': 'dino',
        'dino': {'out_dim': 64, 'hidden_dim': 32, 'bottleneck_dim': 16, 'local_crops_number': 2,
                 'local_crops_size': 16, 'blur_radius': [0.1, 0.5]}})
    result = run(load_config(config))
    assert set(result.metrics) >= {'knn_top1', 'init_knn_top1', 'pixels_knn_top1'} and result.metrics['count'] == 359
    assert 0 < result.metrics['teacher_entropy'] <= math.log(64) + 1e-4  # the epoch's mean, at most ln(out_dim)
    assert result.summary.startswith('k-NN top-1: pretrained ') and 'random init' in result.summary
    state = torch.load(result.run_dir / 'last.pth', weights_only=True)
    student = {k[len('student.'):]: v for k, v in state['model'].items() if k.startswith('student.')}
    teacher = {k[len('teacher.'):]: v for k, v in state['model'].items() if k.startswith('teacher.')}
    assert student.keys() == teacher.keys()
    assert not torch.equal(student['backbone.cls_token'], teacher['backbone.cls_token'])  # an EMA, not a copy
    assert torch.equal(teacher['head.last_layer.weight_g'], torch.ones_like(teacher['head.last_layer.weight_g']))
    assert state['task']['center'].abs().sum() > 0 and state['task']['step'] == state['step']
    # frozen through the first epoch, the student's last layer has not moved, so neither has its EMA
    torch.testing.assert_close(student['head.last_layer.weight_v'], teacher['head.last_layer.weight_v'])


def _dino_full_checkpoint(path, teacher, student):
    """A file laid out as facebookresearch/dino's train_dino writes checkpoint.pth for XCiT (DDP-wrapped student
    and, because of XCiT's BatchNorm, teacher), with the head, optimizer, loss centre and argparse args."""
    import argparse
    head = DINOHead(teacher.num_features, 32, 64, 16).state_dict()
    def wrapped(backbone):
        return {**{f'module.backbone.{k}': v for k, v in backbone.state_dict().items()},
                **{f'module.head.{k}': v for k, v in head.items()}}
    torch.save({'student': wrapped(student), 'teacher': wrapped(teacher), 'optimizer': {'state': {}, 'param_groups': []},
                'epoch': 100, 'args': argparse.Namespace(arch='xcit_nano_12_p16', out_dim=32),
                'dino_loss': {'center': torch.zeros(1, 32)}}, path)


@pytest.mark.parametrize('num_classes', [0, 10])
def test_a_dino_full_checkpoint_loads_its_teacher_backbone_by_default(tmp_path, num_classes):
    from conftest import perturb_
    from xcit.checkpoints import read_state_dict
    torch.manual_seed(0)
    teacher = perturb_(xcit.create_model('xcit_nano_12_p16_224', num_classes=0), seed=1)
    student = perturb_(xcit.create_model('xcit_nano_12_p16_224', num_classes=0), seed=2)
    path = tmp_path / 'checkpoint.pth'
    _dino_full_checkpoint(path, teacher, student)
    model = xcit.create_model('xcit_nano_12_p16_224', num_classes=num_classes, checkpoint_path=path)
    loaded = model.state_dict()
    for key, value in teacher.state_dict().items():
        assert torch.equal(loaded[key], value), key
    students_backbone, _ = read_state_dict(path, ssl_part='student')
    assert all(torch.equal(students_backbone[k], v) for k, v in student.state_dict().items())
    assert not any(k.startswith(('head.', 'backbone.', 'module.')) for k in students_backbone)


def test_our_dino_run_feeds_classification_with_its_teacher_backbone(tmp_path):
    model = _tiny_dino()
    model.update_teacher(0.0)  # any move: the teacher becomes the (perturbed) student
    from conftest import perturb_
    perturb_(model.teacher, seed=3)
    path = tmp_path / 'last.pth'
    torch.save({'format': 'xcit-train', 'model': model.state_dict()}, path)
    classifier = xcit.create_model('xcit_nano_12_p8_224', depth=1, num_classes=10, checkpoint_path=path)
    for key, value in model.teacher.backbone.state_dict().items():
        assert torch.equal(classifier.state_dict()[key], value), key


def test_the_published_dino_backbones_are_tags_that_load_without_a_classifier(tmp_path, monkeypatch):
    """`.dino` for the four XCiT variants facebookresearch/dino released, served here from a pre-filled hub cache
    (a flat teacher state dict, no classifier, as released)."""
    from xcit.registry import get_pretrained_cfg, list_models
    assert set(list_models('*.dino', pretrained=True)) == {f'xcit_{s}_224.dino' for s in (
        'small_12_p16', 'small_12_p8', 'medium_24_p16', 'medium_24_p8')}
    cfg = get_pretrained_cfg('xcit_small_12_p16_224.dino')
    assert cfg['url'] == ('https://dl.fbaipublicfiles.com/dino/dino_xcit_small_12_p16_pretrain/'
                          'dino_xcit_small_12_p16_pretrain.pth') and cfg['num_classes'] == 0
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'hub'))
    torch.manual_seed(0)
    backbone = xcit.create_model('xcit_small_12_p16_224', num_classes=0, depth=1)
    cache = Path(torch.hub.get_dir()) / 'checkpoints'  # where the offline error tells a user to put the file
    cache.mkdir(parents=True)
    torch.save(backbone.state_dict(), cache / 'xcit_small_12_p16_224.dino-dino_xcit_small_12_p16_pretrain.pth')
    model = xcit.create_model('xcit_small_12_p16_224.dino', pretrained=True, depth=1)
    assert model.num_classes == 0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in backbone.state_dict().items())


def test_bad_dino_settings_are_one_line_and_exit_2(tmp_path, capsys):
    from conftest import cli, tiny_run_config
    config = tiny_run_config(tmp_path, task='dino', **{'data.dataset': 'digit_views'})
    for override, needle in (('data.digits_size=8', 'digit_views: size must be 16 to 1024 pixels, not 8'),
                             ('dino.local_crops_scale=[0.5, 0.1]', 'local_crops_scale must be (min, max)'),
                             ('dino.blur_radius=[2, 1]', 'blur_radius must be (min, max)'),
                             ('dino.renders_per_sample=2', 'renders_per_sample above 1 needs task dino on the '
                              'digit_places dataset')):
        code, _, err = cli(capsys, 'train', '-c', config, '-o', override)
        assert code == 2 and len(err) == 1 and needle in err[0] and 'Traceback' not in err[0], err
    code, _, err = cli(capsys, 'train', '-c', config, '-o', 'data.dataset=digit_places', '-o', 'data.digits_size=12')
    assert code == 2 and len(err) == 1 and 'digit_places: size must be a multiple of 8 from 16 to 1024' in err[0], err
    code, _, err = cli(capsys, 'eval', '-c', config, '--load', tmp_path / 'absent.pth', '--mode', 'probe',
                       '--probe-epochs', '0')
    assert code == 2 and len(err) == 1 and '--probe-epochs must be 1 to 10000, not 0' in err[0], err
    assert not (tmp_path / 'runs').exists()


def test_convert_writes_the_chosen_backbone_of_a_dino_run_as_a_classifier_checkpoint(tmp_path, capsys):
    from conftest import cli, perturb_
    torch.manual_seed(0)
    def multicrop():
        backbone = xcit.create_model('xcit_nano_12_p16_224', num_classes=0)
        return MultiCrop(backbone, DINOHead(backbone.num_features, 32, 64, 16))
    model = DINOModel(multicrop(), multicrop())
    perturb_(model.teacher, seed=4)  # teacher and student differ
    run_checkpoint = tmp_path / 'last.pth'
    torch.save({'format': 'xcit-train', 'model': model.state_dict()}, run_checkpoint)
    for part, network in (('teacher', model.teacher), ('student', model.student)):
        out = tmp_path / f'{part}.safetensors'
        code, _, err = cli(capsys, 'convert', str(run_checkpoint), str(out), '--ssl-part', part)
        assert code == 0, err
        classifier = xcit.create_model('xcit_nano_12_p16_224', num_classes=10, checkpoint_path=out)
        loaded = classifier.state_dict()
        for key, value in network.backbone.state_dict().items():
            assert torch.equal(loaded[key], value), (part, key)


def test_eval_knn_mode_reads_out_any_weights_and_agrees_with_the_read_out_functions(tmp_path, capsys):
    """`xcit eval --mode knn` on a classification config: the k-NN top-1 of the loaded backbone's features,
    the number `extract_features` + `knn_accuracy` give on the same splits."""
    from conftest import cli, perturb_, tiny_run_config
    from xcit.config import load_config
    from xcit.data import build_eval_loader, build_source
    from xcit.ssl.knn import extract_features
    torch.manual_seed(0)
    backbone = perturb_(xcit.create_model('xcit_nano_12_p8_224', depth=1, num_classes=0), seed=5)
    weights = tmp_path / 'backbone.pth'
    torch.save(backbone.state_dict(), weights)
    config_path = tiny_run_config(tmp_path, **{'model.kwargs': {'depth': 1}})
    code, out, err = cli(capsys, 'eval', '-c', config_path, '--load', str(weights), '--mode', 'knn')
    assert code == 0, err
    line = next(x for x in out if x.startswith('final evaluation: k-NN top-1: these weights '))
    reported = float(line.split('these weights ')[1].split('%')[0])
    config = load_config(config_path)
    features = [extract_features(backbone, build_eval_loader(config, backbone.pretrained_cfg,
                                                             build_source(config, split), 0, 1, False))
                for split in ('train', 'val')]
    assert reported == pytest.approx(knn_accuracy(*features[0], *features[1]), abs=0.05)
    assert 'linear probe' not in line and 'raw pixels' in line


def _global_batch(crops=4, batch=6, out_dim=16):
    """Student (crops x batch, K) and teacher (2 x batch, K) logits of one global batch, crop-major."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(crops * batch, out_dim, generator=g) * 3, torch.randn(2 * batch, out_dim, generator=g) * 3


def _shard(logits, crops, rank, world):
    """Rank `rank`'s rows: its share of the batch within every crop, still crop-major."""
    return torch.cat([chunk.chunk(world)[rank] for chunk in logits.chunk(crops)])


def _loss_rank(rank, port, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    student, teacher = _global_batch()
    loss = DINOLoss(16, crops=4)
    loss.center.fill_(0.25)
    value = loss(_shard(student, 4, rank, 2), _shard(teacher, 2, rank, 2), teacher_temp=0.05)
    dist.all_reduce(mean := value.detach().clone())  # what DDP's gradient averaging optimises: the ranks' mean
    torch.save(dict(loss=mean / 2, center=loss.center), os.path.join(out, f'{rank}.pt'))
    dist.destroy_process_group()


def test_two_gloo_ranks_give_the_loss_and_centre_of_one_process_on_the_same_global_batch(tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_loss_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    student, teacher = _global_batch()
    single = DINOLoss(16, crops=4)
    single.center.fill_(0.25)
    expected = single(student, teacher, teacher_temp=0.05)
    assert not torch.allclose(single.center, torch.full_like(single.center, 0.25))  # the centre did move
    for rank in range(2):
        got = torch.load(tmp_path / f'{rank}.pt')
        torch.testing.assert_close(got['loss'], expected.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got['center'], single.center, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_a_dino_run_killed_mid_epoch_resumes_bit_exactly(tmp_path, monkeypatch):
    """Student, teacher, the loss centre and the step survive SIGKILL: the resumed run ends where an
    uninterrupted one does, bit for bit (with the places of digit_places' draws drawn again alike)."""
    from conftest import sigkill_then_resume, tiny_run_config
    monkeypatch.setenv('XCIT_FAST_PATH_CACHE', str(tmp_path / 'fast_paths.json'))
    config = tiny_run_config(tmp_path, **{
        'task': 'dino', 'model.kwargs': {'depth': 1}, 'data.dataset': 'digit_places', 'data.digits_size': 16,
        'data.image_size': 16, 'schedule.epochs': 2, 'train.checkpoint_interval': 5,
        'optim.weight_decay_end': 0.4, 'optim.clip_grad': 3.0, 'optim.clip_mode': 'per_parameter',
        'dino': {'out_dim': 32, 'hidden_dim': 32, 'bottleneck_dim': 16, 'local_crops_number': 1,
                 'renders_per_sample': 2, 'use_bn_in_head': True,
                 'local_crops_size': 8, 'blur_radius': [0.1, 0.5], 'knn_k': 5}})
    expected, actual = sigkill_then_resume(tmp_path, config)
    assert torch.equal(expected['task']['center'], actual['task']['center'])
    assert expected['task']['step'] == actual['task']['step'] == expected['step']


def test_the_random_init_baseline_reads_out_a_copy_with_batchnorm_statistics_of_the_train_images():
    from xcit.ssl.knn import with_data_statistics
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
    images = [torch.randn(5, 3, 6, 6) * 2 + 1 for _ in range(3)]
    batches = [(x, torch.zeros(len(x), dtype=torch.long)) for x in images] + [(torch.zeros(0, 3, 6, 6), torch.zeros(0))]
    calibrated = with_data_statistics(backbone, batches)
    with torch.no_grad():
        conv = torch.cat([backbone[0](x) for x in images])  # (15, 4, 4, 4): what the BatchNorm sees
    # equal batches: the average of the batch means is the mean over every pixel of every image
    torch.testing.assert_close(calibrated[1].running_mean, conv.mean((0, 2, 3)))
    assert not calibrated.training
    assert torch.equal(backbone[1].running_mean, torch.zeros(4)) and backbone[1].momentum == 0.1  # untouched
    assert calibrated[1].momentum == 0.1
    assert torch.equal(calibrated[0].weight, backbone[0].weight)
