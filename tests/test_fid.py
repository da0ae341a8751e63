"""fid.py against the golden fixtures (pytorch-fid / torch-fidelity / ADM outputs, see tests/fixtures) plus the
evaluation plumbing on tiny inputs. CPU, offline: the real Inception weights are never fetched."""
import json
import sys
import urllib.error
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fid  # noqa: E402
from model import UserError  # noqa: E402

FIXTURES = Path(__file__).parent / 'fixtures'


def seeded_state_dict():
    """The golden README's rule: one crc32(key)-seeded generator per floating tensor."""
    state = {}
    for key, shape, dtype in json.loads((FIXTURES / 'inception_keys.json').read_text())['keys']:
        if dtype != 'float32':
            state[key] = torch.zeros(shape, dtype=torch.int64)  # num_batches_tracked
            continue
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        if key.endswith(('running_var', '.bn.weight')):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith(('running_mean', '.bn.bias')):
            state[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 4:
            state[key] = torch.randn(shape, generator=g) * (2.0 / (shape[1] * shape[2] * shape[3])) ** 0.5
        elif key == 'fc.weight':
            state[key] = torch.randn(shape, generator=g) * 0.01
        else:
            assert key == 'fc.bias'
            state[key] = torch.zeros(shape)
    return state


@pytest.fixture(scope='module')
def seeded_net():
    net = fid.InceptionV3()
    net.load_state_dict(seeded_state_dict(), strict=True)
    return net.to(memory_format=torch.channels_last).eval()  # as load_inception returns it


# ----------------------------------------------------------------------------- network and input path

def test_state_dict_layout():
    keys = json.loads((FIXTURES / 'inception_keys.json').read_text())['keys']
    state = fid.InceptionV3().state_dict()
    assert [(k, list(v.shape), str(v.dtype).removeprefix('torch.')) for k, v in state.items()] == \
        [(k, s, d) for k, s, d in keys]


def test_seeded_forward_matches_pytorch_fid(seeded_net):
    gold = torch.load(FIXTURES / 'inception_seeded.pt', weights_only=True)
    captured = {}
    hook = seeded_net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(m6d=o))
    with torch.inference_mode():
        pool3, spatial, logits = seeded_net(gold['x'])  # already 299 and in [-1, 1]: straight into the first conv
    hook.remove()
    tol = dict(atol=5e-4, rtol=1e-4)
    torch.testing.assert_close(pool3, gold['pool3'], **tol)
    torch.testing.assert_close(logits, gold['logits'], **tol)  # fc.bias is zero in the fixture
    torch.testing.assert_close(captured['m6d'], gold['mixed6d_branch1x1'], **tol)
    torch.testing.assert_close(spatial, gold['spatial_adm'], **tol)


@pytest.mark.parametrize('size', ['256', '32'])
def test_tf1_resize(size):
    gold = torch.load(FIXTURES / 'tf1_resize.pt', weights_only=True)
    img = gold[f'img{size}']  # NCHW in the fixture; fid.py works on NHWC
    ours = fid.tf1_resize(img.permute(0, 2, 3, 1).float()).permute(0, 3, 1, 2)
    torch.testing.assert_close(ours, gold[f'tf1_{size}'], atol=1e-3, rtol=0)  # (it is bit-exact on CPU)
    torch.testing.assert_close(fid.tf1_resize(img.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), ours, atol=0, rtol=0)
    # guard against a swap to torch's resize, which samples at half-pixel centres
    assert (ours - F.interpolate(img.float(), size=(299, 299), mode='bilinear', align_corners=False)).abs().max() > 1
    # the input path: NHWC uint8 -> resize -> (x - 128) / 128 -> NCHW
    torch.testing.assert_close(fid.preprocess(img.permute(0, 2, 3, 1)), (gold[f'tf1_{size}'] - 128) / 128,
                               atol=1e-5, rtol=0)


def test_activations_are_the_input_path_then_the_network(seeded_net, monkeypatch):
    # a non-zero fc bias (zero in the fixture) must not reach the logits: ADM's IS reads them before the bias
    monkeypatch.setattr(seeded_net.fc, 'bias', nn.Parameter(torch.full((1008,), 5.0)))
    images = np.random.default_rng(0).integers(0, 256, (3, 48, 40, 3), dtype=np.uint8)
    pool3, spatial, logits = fid.activations(images, seeded_net, batch_size=2)  # two batches, the last one short
    with torch.inference_mode():
        direct = seeded_net(fid.preprocess(torch.from_numpy(images)))
    assert (pool3.shape, spatial.shape, logits.shape) == ((3, 2048), (3, 2023), (3, 1008))
    for ours, want in zip((pool3, spatial, logits), direct):
        np.testing.assert_allclose(ours, want.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits, pool3 @ seeded_net.fc.weight.detach().numpy().T, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- ADM statistics and metrics

@pytest.fixture(scope='module')
def adm():
    with np.load(FIXTURES / 'adm_metrics.npz', allow_pickle=False) as z:
        return dict(z)


def test_adm_fid_sfid_is(adm):
    fid_value = fid.frechet_distance(*fid.statistics(adm['sample_pool']), *fid.statistics(adm['ref_pool']))
    sfid_value = fid.frechet_distance(*fid.statistics(adm['sample_spatial']), *fid.statistics(adm['ref_spatial']))
    assert fid_value == pytest.approx(float(adm['fid']), rel=1e-5)
    assert sfid_value == pytest.approx(float(adm['sfid']), rel=1e-5)
    assert fid.inception_score(adm['sample_logits']) == pytest.approx(float(adm['inception_score']), rel=1e-5)


def test_adm_precision_recall(adm):
    # rows=64: several distance blocks, the last one short
    precision, recall = fid.precision_recall(adm['ref_pool'], adm['sample_pool'], rows=64)
    assert precision == float(adm['precision']) and recall == float(adm['recall'])
    radii = fid.knn_radii(torch.from_numpy(adm['ref_pool']), 3, rows=64).numpy()
    np.testing.assert_allclose(radii, adm['ref_radii'], rtol=1e-5)


def test_adm_singular_fid_plain_and_eps_branch(adm, monkeypatch):
    with pytest.warns(UserWarning, match='singular'):
        stats = fid.statistics(adm['sample_small']) + fid.statistics(adm['ref_small'])
    assert fid.frechet_distance(*stats) == pytest.approx(float(adm['fid_singular_noeps']), rel=1e-4)
    # ADM only takes its eps branch when sqrtm returns non-finite entries: make the first call do so
    sqrtm, calls = fid.linalg.sqrtm, []

    def failing_once(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else sqrtm(a)
    monkeypatch.setattr(fid.linalg, 'sqrtm', failing_once)
    with pytest.warns(UserWarning, match='adding 1e-06'):
        assert fid.frechet_distance(*stats) == pytest.approx(float(adm['fid_singular']), rel=1e-4)
    assert len(calls) == 2


def test_imaginary_sqrtm_is_a_clear_error(adm, monkeypatch):
    monkeypatch.setattr(fid.linalg, 'sqrtm', lambda a: np.eye(len(a)) * (1 + 1j))
    with pytest.raises(UserError, match='imaginary component'):
        fid.frechet_distance(*fid.statistics(adm['sample_pool']), *fid.statistics(adm['ref_pool']))


# ----------------------------------------------------------------------------- evaluation plumbing, tiny network

class TinyNet(nn.Module):
    """Stands in for the Inception (same outputs, 8/6/10 dims) so covariances are full rank with ~50 images."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer('w', torch.randn(48, 24, generator=g))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = F.adaptive_avg_pool2d(x, 4).flatten(1) @ self.w
        return torch.tanh(h[:, :8]), h[:, 8:14], 3 * h[:, 14:]


def make_images(n, seed, shift=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, (n, 1, 1, 3)) + rng.integers(0, 56, (n, 32, 32, 3)) + shift
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.fixture
def ref_npz(tmp_path):
    path = tmp_path / 'ref.npz'
    np.savez(path, arr_0=make_images(50, 1))
    return path


def metrics_close(a, b):
    assert a.keys() == {'fid', 'sfid', 'inception_score', 'precision', 'recall'} == b.keys()
    for k in ('fid', 'sfid', 'inception_score'):
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-8), k
    assert (a['precision'], a['recall']) == (b['precision'], b['recall'])


def test_evaluate_sources_order_and_cache(ref_npz, tmp_path):
    net, samples = TinyNet(), make_images(40, 2, shift=20)
    metrics = fid.evaluate(samples, ref_npz, net, batch_size=16)
    assert 0 < metrics['fid'] and 0 < metrics['precision'] < 1 and 0 < metrics['recall'] <= 1
    cache = list(tmp_path.glob('ref.inception-*.npz'))
    assert len(cache) == 1
    # the reference now comes from the cache: only the samples go through the network
    np.savez(tmp_path / 'samples.npz', arr_0=samples)
    net.calls = 0
    metrics_close(fid.evaluate(tmp_path / 'samples.npz', ref_npz, net, batch_size=16), metrics)
    assert net.calls == 3
    # sample order does not matter
    metrics_close(fid.evaluate(samples[np.random.default_rng(3).permutation(40)], ref_npz, net), metrics)
    # a folder of PNGs is the same samples
    (tmp_path / 'pngs').mkdir()
    for i, img in enumerate(samples):
        Image.fromarray(img).save(tmp_path / 'pngs' / f'{i:05d}.png')
    metrics_close(fid.evaluate(tmp_path / 'pngs', ref_npz, net, batch_size=16), metrics)
    # other weights, other cache entry
    other = TinyNet()
    other.w.mul_(-1)
    fid.evaluate(samples, ref_npz, other)
    assert len(list(tmp_path.glob('ref.inception-*.npz'))) == 2


def test_evaluate_against_itself(ref_npz):
    with np.load(ref_npz) as f:
        images = f['arr_0']
    metrics = fid.evaluate(images, ref_npz, TinyNet())
    assert metrics['fid'] == pytest.approx(0, abs=1e-6) and metrics['sfid'] == pytest.approx(0, abs=1e-6)
    assert metrics['precision'] == metrics['recall'] == 1.0


def test_evaluate_ignores_callers_autocast(ref_npz):
    samples = make_images(40, 2, shift=20)
    plain = fid.evaluate(samples, ref_npz, TinyNet())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        metrics_close(fid.evaluate(samples, ref_npz, TinyNet()), plain)


def test_reference_statistics_from_the_file(ref_npz, tmp_path):
    net, samples = TinyNet(), make_images(40, 2, shift=20)
    with np.load(ref_npz) as f:
        images = f['arr_0']
    pool3, spatial, _ = fid.activations(images, net)
    (mu, sigma), (mu_s, sigma_s) = fid.statistics(pool3), fid.statistics(spatial)
    np.savez(tmp_path / 'with_stats.npz', arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    metrics_close(fid.evaluate(samples, tmp_path / 'with_stats.npz', net), fid.evaluate(samples, ref_npz, net))
    # the file's statistics are used when present (ADM's are of more images than arr_0 holds); arr_0 for P/R
    np.savez(tmp_path / 'shifted.npz', arr_0=images, mu=mu + 1, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    shifted, plain = fid.evaluate(samples, tmp_path / 'shifted.npz', net), fid.evaluate(samples, ref_npz, net)
    assert shifted['fid'] > plain['fid'] + 1
    assert (shifted['sfid'], shifted['precision'], shifted['recall']) == pytest.approx(
        (plain['sfid'], plain['precision'], plain['recall']))


def test_cli_writes_json(ref_npz, tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / 'samples.npz', arr_0=make_images(40, 2, shift=20))
    monkeypatch.setattr(fid, 'load_inception', lambda weights, device: TinyNet())
    fid.main(['--ref', str(ref_npz), '--sample', str(tmp_path / 'samples.npz'), '--device', 'cpu'])
    written = json.loads((tmp_path / 'samples.metrics.json').read_text())
    metrics_close(written, fid.evaluate(tmp_path / 'samples.npz', ref_npz, TinyNet()))
    assert 'fid' in capsys.readouterr().out


# ----------------------------------------------------------------------------- clear one-line errors

def test_bad_inputs(ref_npz, tmp_path):
    net, good = TinyNet(), make_images(10, 0)
    (tmp_path / 'samples.txt').write_text('hello')
    np.savez(tmp_path / 'no_arr0.npz', images=good)
    np.savez(tmp_path / 'float.npz', arr_0=good.astype(np.float32))
    cases = [(tmp_path / 'samples.txt', 'not an .npz'),
             (tmp_path / 'missing.npz', 'no such file'),
             (tmp_path / 'no_arr0.npz', 'no arr_0'),
             (tmp_path / 'float.npz', 'uint8'),
             (good.astype(np.float32), 'uint8'),
             (good.transpose(0, 3, 1, 2), r'\(N, H, W, 3\)'),
             (good[:3], 'at least 4')]
    for samples, message in cases:
        with pytest.raises(UserError, match=message):
            fid.evaluate(samples, ref_npz, net)
    with pytest.raises(UserError, match='no arr_0'):
        fid.evaluate(good, tmp_path / 'no_arr0.npz', net)


def test_nan_reference_statistics(ref_npz, tmp_path):
    with np.load(ref_npz) as f:
        images = f['arr_0']
    mu, sigma = np.zeros(8, np.float32), np.eye(8)
    mu[3] = np.nan
    np.savez(tmp_path / 'nan.npz', arr_0=images, mu=mu, sigma=sigma, mu_s=np.zeros(6), sigma_s=np.eye(6))
    with pytest.raises(UserError, match='NaN'):
        fid.evaluate(make_images(10, 0), tmp_path / 'nan.npz', TinyNet())


def test_weights_errors(tmp_path, monkeypatch):
    torch.save({'conv.weight': torch.zeros(3)}, tmp_path / 'wrong_keys.pth')
    with pytest.raises(UserError, match='not the FID Inception state_dict'):
        fid.load_inception(tmp_path / 'wrong_keys.pth')
    (tmp_path / 'garbage.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(UserError, match='cannot read'):
        fid.load_inception(tmp_path / 'garbage.pth')
    torch.save(seeded_state_dict(), tmp_path / 'seeded.pth')  # right layout, wrong bytes
    with pytest.raises(UserError, match='sha256'):
        fid.load_inception(tmp_path / 'seeded.pth')


def test_load_local_weights(tmp_path, monkeypatch):
    # pretend the seeded file is the released one; it may come without BatchNorm's num_batches_tracked counters
    state = {k: v for k, v in seeded_state_dict().items() if 'num_batches' not in k}
    torch.save(state, tmp_path / 'weights.pth')
    monkeypatch.setattr(fid, 'WEIGHTS_SHA256', fid.sha256(tmp_path / 'weights.pth')[:8])
    net = fid.load_inception(tmp_path / 'weights.pth')
    assert not net.training
    torch.testing.assert_close(net.Mixed_7c.branch_pool.conv.weight, state['Mixed_7c.branch_pool.conv.weight'],
                               atol=0, rtol=0)


def test_offline_download_names_the_flag(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution\n(second line)')
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
    with pytest.raises(UserError) as info:
        fid.load_inception()
    message = str(info.value)
    assert '--inception-weights PATH' in message and '\n' not in message


def test_cli_error_is_one_line(ref_npz, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fid, 'load_inception', lambda weights, device: TinyNet())
    (tmp_path / 'samples.txt').write_text('hello')
    with pytest.raises(SystemExit) as info:
        fid.main(['--ref', str(ref_npz), '--sample', str(tmp_path / 'samples.txt'), '--device', 'cpu'])
    err = str(info.value.code)  # sys.exit(message): printed to stderr, exit status 1
    assert err.startswith('error:') and 'not an .npz' in err and '\n' not in err


def test_smoke_test_weights_run_end_to_end_and_say_so(tmp_path, capsys):
    """--inception-weights random-smoke-test: the real network with random weights, offline; every line that reports
    numbers, and the JSON, says that they are meaningless."""
    np.savez(tmp_path / 'ref.npz', arr_0=make_images(6, 0))
    np.savez(tmp_path / 'samples.npz', arr_0=make_images(5, 1, shift=20))
    fid.main(['--ref', str(tmp_path / 'ref.npz'), '--sample', str(tmp_path / 'samples.npz'), '--device', 'cpu',
              '--inception-weights', 'random-smoke-test', '--batch-size', '6'])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 7 and all('meaningless' in line for line in lines)
    written = json.loads((tmp_path / 'samples.metrics.json').read_text())
    assert 'meaningless' in written.pop('warning')
    assert sorted(written) == ['fid', 'inception_score', 'precision', 'recall', 'sfid']
    assert all(np.isfinite(v) for v in written.values())
