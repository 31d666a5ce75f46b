"""Tests of bnnorm.experiments in quick mode on the offline digits, and on CIFAR-10 when found."""
import copy
import json
import math

import numpy as np
import pytest
from matplotlib.figure import Figure

from bnnorm import experiments
from bnnorm.experiments import (EXPERIMENTS, ROW_COLUMNS, execute_run, format_stat,
                                iterations_per_epoch, load_dataset, plan_runs, plot_experiment,
                                summarize_experiment)

QUICK_SEEDS = (0, 1)


@pytest.fixture(scope='module')
def digits():
    return load_dataset('digits')


@pytest.fixture(scope='module')
def quick_results(digits):
    results = {}
    for name in EXPERIMENTS:
        runs = plan_runs(name, seeds=QUICK_SEEDS, quick=True)
        results[name] = [execute_run(run, digits) for run in runs]
    return results


def test_experiment_names():
    assert list(EXPERIMENTS) == ['baseline', 'weight_scale', 'batch_size', 'layernorm_batch_size',
                                 'precise_stats']


@pytest.mark.parametrize('name, conditions, quick_conditions', [
    ('baseline', 2, 2),
    ('weight_scale', 40, 6),
    ('batch_size', 4, 4),
    ('layernorm_batch_size', 7, 7),
    ('precise_stats', 6, 6),
])
def test_plan_runs_counts(name, conditions, quick_conditions):
    assert len(plan_runs(name)) == conditions * 3
    assert len(plan_runs(name, quick=True)) == quick_conditions * 3
    assert len(plan_runs(name, seeds=[4])) == conditions


@pytest.mark.parametrize('name', list(EXPERIMENTS))
def test_plan_runs_ids_stable_unique(name):
    runs = plan_runs(name)
    ids = [run['run_id'] for run in runs]
    assert len(set(ids)) == len(ids)
    assert ids == [run['run_id'] for run in plan_runs(name)]
    assert all(run_id.startswith(name + '-') for run_id in ids)
    assert all(set(run_id) <= set('abcdefghijklmnopqrstuvwxyz0123456789._-') for run_id in ids)
    assert json.loads(json.dumps(runs)) == runs


def test_plan_runs_ids_independent_of_mode():
    quick_ids = {run['run_id'] for run in plan_runs('baseline', quick=True)}
    assert quick_ids == {run['run_id'] for run in plan_runs('baseline', epochs=4)}


def test_plan_runs_settings():
    weight_scale = plan_runs('weight_scale')
    scales = sorted({run['weight_scale'] for run in weight_scale})
    assert len(scales) == 20
    assert scales[0] == pytest.approx(1e-4)
    assert scales[-1] == pytest.approx(1.0)
    assert np.allclose(np.diff(np.log10(scales)), 4 / 19)
    assert all(run['hidden_dims'] == [50] * 7 for run in weight_scale)

    baseline = plan_runs('baseline')
    assert {run['normalization'] for run in baseline} == {'none', 'batchnorm'}
    assert all(run['learning_rate'] == 1e-3 for run in baseline)
    assert all(run['batch_size'] == 50 for run in baseline)
    assert all(run['weight_scale'] == 2e-2 for run in baseline)
    assert all(run['hidden_dims'] == [100] * 5 for run in baseline)
    assert all(run['num_epochs'] == 10 for run in baseline)
    assert all(run['num_train'] == 1000 for run in baseline)

    batch = plan_runs('batch_size')
    assert {(run['normalization'], run['batch_size']) for run in batch} == {
        ('batchnorm', 5), ('batchnorm', 10), ('batchnorm', 50), ('none', 5)}
    assert all(run['learning_rate'] == pytest.approx(10**-3.5) for run in batch)

    precise = plan_runs('precise_stats')
    assert {(run['batch_size'], run['momentum']) for run in precise} == {
        (b, m) for b in (5, 10, 50) for m in (0.9, 0.99)}
    assert all(run['precise'] for run in precise)
    assert all(run['normalization'] == 'batchnorm' for run in precise)

    assert all(run['num_epochs'] == 2 for run in plan_runs('baseline', quick=True))
    assert all(run['num_epochs'] == 7 for run in plan_runs('baseline', epochs=7, quick=True))


@pytest.mark.parametrize('kwargs, message', [
    ({'name': 'nope'}, 'unknown experiment'),
    ({'name': 'baseline', 'seeds': []}, 'seeds is empty'),
    ({'name': 'baseline', 'seeds': [0, 0]}, 'duplicates'),
    ({'name': 'baseline', 'seeds': [-1]}, 'invalid seed -1'),
    ({'name': 'baseline', 'seeds': [True]}, 'invalid seed True'),
    ({'name': 'baseline', 'epochs': 0}, 'invalid epochs 0'),
    ({'name': 'baseline', 'epochs': 1.5}, 'invalid epochs 1.5'),
])
def test_plan_runs_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_runs(**kwargs)


def test_execute_run_rows(digits):
    config = plan_runs('baseline', seeds=[0], quick=True)[1]
    result = execute_run(config, digits)
    rows = result['rows']

    assert [tuple(row) for row in rows] == [ROW_COLUMNS] * len(rows)
    assert [row['epoch'] for row in rows] == list(range(config['num_epochs'] + 1))
    assert all(row['run_id'] == config['run_id'] for row in rows)
    assert all(row['normalization'] == 'batchnorm' for row in rows)
    assert all(row['dataset'] == 'digits' for row in rows)
    assert all(0.0 <= row['train_acc'] <= 1.0 for row in rows)
    assert all(0.0 <= row['val_acc'] <= 1.0 for row in rows)
    assert rows[0]['loss'] is None
    assert all(math.isfinite(row['loss']) for row in rows[1:])
    assert not any(row['diverged'] for row in rows)
    assert all(row['val_acc_precise'] is None for row in rows)

    iterations = iterations_per_epoch(config['num_train'], config['batch_size'])
    assert [row['iteration'] for row in rows] == [epoch * iterations for epoch in range(len(rows))]
    assert len(result['curves']['loss']) == iterations * config['num_epochs']
    assert json.loads(json.dumps(result, allow_nan=False)) == result


def test_execute_run_learns_digits(digits):
    config = dict(plan_runs('baseline', seeds=[0], quick=True)[1], num_train=500, num_epochs=5)
    rows = execute_run(config, digits)['rows']
    assert rows[-1]['val_acc'] > 0.8, 'a batch-norm net reaches about 0.97 here; chance is 0.1'


def test_execute_run_divergence_recorded(digits):
    config = plan_runs('weight_scale', seeds=[0], quick=True)[0]
    config = dict(config, weight_scale=1e4, learning_rate=1e3)
    result = execute_run(config, digits)
    rows = result['rows']

    assert rows, 'a diverged run keeps the rows of the epochs recorded before it diverged'
    assert all(row['diverged'] for row in rows)
    assert json.loads(json.dumps(result, allow_nan=False)) == result


def test_execute_run_reproducible(digits):
    first, second = plan_runs('batch_size', seeds=[3], quick=True)[:2]
    result_first = execute_run(first, digits)
    result_second = execute_run(second, digits)
    assert execute_run(second, digits) == result_second
    assert execute_run(first, digits) == result_first


def test_execute_run_same_in_worker_processes(digits):
    from joblib import Parallel, delayed
    configs = plan_runs('precise_stats', seeds=[0], quick=True)[:2]
    in_workers = Parallel(n_jobs=2, backend='loky')(
        delayed(execute_run)(config, digits) for config in configs)
    in_reverse_order = [execute_run(config, digits) for config in reversed(configs)]
    assert in_workers == in_reverse_order[::-1]


def test_execute_run_seeds_differ(digits):
    run_a, run_b = plan_runs('baseline', seeds=[0, 1], quick=True)[:2]
    assert execute_run(run_a, digits)['curves'] != execute_run(run_b, digits)['curves']


def test_shared_condition_same_result(quick_results):
    def training_columns(result):
        return [(row['train_acc'], row['val_acc'], row['loss']) for row in result['rows']]

    in_batch_size = next(result for result in quick_results['batch_size']
                         if result['rows'][0]['run_id'] == 'batch_size-batchnorm-bs5-seed0')
    in_precise = next(result for result in quick_results['precise_stats']
                      if result['rows'][0]['run_id'] == 'precise_stats-bs5-m0.9-seed0')
    assert training_columns(in_batch_size) == training_columns(in_precise)


def test_execute_run_bad_config(digits):
    config = plan_runs('baseline', seeds=[0], quick=True)[0]
    with pytest.raises(ValueError, match="invalid normalization 'groupnorm'"):
        execute_run(dict(config, normalization='groupnorm'), digits)
    with pytest.raises(ValueError, match='invalid batch_size 0'):
        execute_run(dict(config, batch_size=0), digits)
    with pytest.raises(ValueError, match='invalid learning_rate'):
        execute_run(dict(config, learning_rate=float('nan')), digits)
    with pytest.raises(ValueError, match='is missing'):
        execute_run({'run_id': 'x'}, digits)
    with pytest.raises(ValueError, match='needs 100000 train samples'):
        execute_run(dict(config, num_train=100000), digits)


def test_precise_stats_columns(quick_results):
    for result in quick_results['precise_stats']:
        rows = result['rows']
        for row in rows[:-1]:
            assert row['val_acc_precise'] is None
        for key in ('val_acc_moving', 'val_acc_precise', 'test_acc_moving', 'test_acc_precise'):
            assert 0.0 <= rows[-1][key] <= 1.0, key


@pytest.mark.parametrize('name', list(EXPERIMENTS))
def test_plot_experiment_labels(name, quick_results, tmp_path):
    path = tmp_path / f'{name}.png'
    fig = plot_experiment(name, quick_results[name], path=path)

    assert isinstance(fig, Figure)
    assert fig.axes
    for ax in fig.axes:
        assert ax.get_xlabel(), f'{name}: an axis has no x label'
        assert ax.get_ylabel(), f'{name}: an axis has no y label'
        assert ax.get_title(), f'{name}: an axis has no title'
    assert fig.get_suptitle().startswith(EXPERIMENTS[name].title)
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_plot_weight_scale_log_axis(quick_results):
    fig = plot_experiment('weight_scale', quick_results['weight_scale'])
    assert all(ax.get_xscale() == 'log' for ax in fig.axes)


def test_plot_rejects_other_experiment(quick_results):
    with pytest.raises(ValueError, match="belongs to experiment 'batch_size', not 'baseline'"):
        plot_experiment('baseline', quick_results['batch_size'])


def test_summarize_rejects_empty_results():
    with pytest.raises(ValueError, match="no results for experiment 'baseline'"):
        summarize_experiment('baseline', [])


@pytest.mark.parametrize('name', list(EXPERIMENTS))
def test_summarize_contains_numbers(name, quick_results):
    results = quick_results[name]
    summary = summarize_experiment(name, results)
    assert summary.startswith(f'## {EXPERIMENTS[name].title}')

    keys = list(EXPERIMENTS[name].conditions[0])
    for runs in experiments.group_runs(results, keys).values():
        final_val = format_stat([run['rows'][-1]['val_acc'] for run in runs])
        assert final_val in summary


def test_summarize_weight_scale_counts(quick_results):
    summary = summarize_experiment('weight_scale', quick_results['weight_scale'])
    assert 'of 3 scales' in summary


def test_summarize_precise_difference(quick_results):
    summary = summarize_experiment('precise_stats', quick_results['precise_stats'])
    run = quick_results['precise_stats'][0]['rows'][-1]
    assert 'precise minus moving' in summary
    assert f"{run['val_acc_moving']:.3f}" in summary


def test_load_dataset_unknown():
    with pytest.raises(ValueError, match="expected 'digits' or 'cifar10'"):
        load_dataset('mnist')


def test_load_dataset_cifar10_not_found(monkeypatch):
    monkeypatch.setattr(experiments, 'find_cifar10_dir', lambda: None)
    with pytest.raises(FileNotFoundError, match='download=True'):
        load_dataset('cifar10')


def test_load_dataset_cifar10_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / 'absent')):
        load_dataset('cifar10', data_dir=tmp_path / 'absent')


@pytest.fixture
def cifar10_dir():
    from bnnorm.data import find_cifar10_dir
    found = find_cifar10_dir()
    if found is None:
        pytest.skip('no CIFAR-10 directory found: set $BNNORM_CIFAR10_DIR to run this test')
    return found


def test_load_dataset_cifar10_quick(cifar10_dir):
    data = load_dataset('cifar10', quick=True)
    assert data['dataset'] == 'cifar10'
    assert data['X_train'].shape == (1000, 3, 32, 32)
    assert data['X_val'].shape == (200, 3, 32, 32)
    assert data['X_test'].shape == (200, 3, 32, 32)
    assert len(data['class_names']) == 10


def test_load_dataset_cifar10_parent_dir(cifar10_dir):
    from_parent = load_dataset('cifar10', data_dir=cifar10_dir.parent, quick=True)
    from_dir = load_dataset('cifar10', data_dir=cifar10_dir, quick=True)
    assert np.array_equal(from_parent['X_val'], from_dir['X_val'])


def test_plan_runs_seeds_int():
    with pytest.raises(TypeError, match=r'sequence of integers such as range\(3\)'):
        plan_runs('baseline', seeds=3)


def test_seed_band_empty():
    with pytest.raises(ValueError, match='no series'):
        experiments.seed_band([])


@pytest.mark.parametrize('num_train, batch_size, message', [
    (10, 0, 'invalid batch_size 0'),
    (10, -2, 'invalid batch_size -2'),
    (-1, 5, 'invalid num_train -1'),
])
def test_iterations_per_epoch_bad(num_train, batch_size, message):
    with pytest.raises(ValueError, match=message):
        iterations_per_epoch(num_train, batch_size)


@pytest.mark.parametrize('changes, message', [
    ({'precise': True}, 'precise=True needs batch norm'),
    ({'dtype': 'int32'}, "invalid dtype 'int32'"),
    ({'dtype': 'float16'}, "invalid dtype 'float16'"),
    ({'num_val': 0}, 'invalid num_val 0'),
    ({'num_val': 2.5}, 'invalid num_val 2.5'),
])
def test_check_config_rejects(changes, message):
    config = plan_runs('baseline', seeds=[0], quick=True)[0]
    assert config['normalization'] == 'none'
    with pytest.raises(ValueError, match=message):
        experiments.check_config(dict(config, **changes))


def test_check_config_accepts_float64():
    config = plan_runs('baseline', seeds=[0], quick=True)[1]
    experiments.check_config(dict(config, dtype='float64', num_val=None))


def _table_line(summary, label):
    return next(line for line in summary.splitlines() if line.startswith(f'| {label} |'))


def test_summarize_defines_diverged(quick_results):
    summary = summarize_experiment('baseline', quick_results['baseline'])
    assert 'non-finite' in summary
    assert 'exploded' in summary


def test_summarize_counts_exploded(quick_results):
    results = copy.deepcopy(quick_results['baseline'])
    baseline_runs = [r for r in results if r['rows'][0]['normalization'] == 'none']
    baseline_runs[0]['rows'][-1]['loss'] = 2e7
    summary = summarize_experiment('baseline', results)
    assert _table_line(summary, 'baseline').endswith('| 0 of 2 | 1 of 2 |')
    assert _table_line(summary, 'batch norm').endswith('| 0 of 2 | 0 of 2 |')


def test_summarize_weight_scale_ties(quick_results):
    results = copy.deepcopy(quick_results['weight_scale'])
    for result in results:
        for row in result['rows']:
            row['val_acc'] = 0.1
    summary = summarize_experiment('weight_scale', results)
    assert 'tie at 3 of 3 scales' in summary
    assert 'largest gap' not in summary
    assert 'at 0 of 3 scales' not in summary


def test_summarize_quick_mode_warning(quick_results):
    summary = summarize_experiment('baseline', quick_results['baseline'])
    assert summary.splitlines()[2].startswith('Quick mode is a smoke test')
    assert 'near chance' in summary.splitlines()[2]

    full = copy.deepcopy(quick_results['baseline'])
    for result in full:
        for row in result['rows']:
            row['quick'] = False
    assert 'smoke test' not in summarize_experiment('baseline', full)


def test_summarize_one_seed(quick_results):
    results = [r for r in quick_results['baseline'] if r['rows'][0]['seed'] == 0]
    summary = summarize_experiment('baseline', results)
    assert '1 seed' in summary
    assert '1 seeds' not in summary
    assert '±' not in summary
    last_val = results[0]['rows'][-1]['val_acc']
    assert f'{last_val:.3f}' in _table_line(summary, 'baseline')


def test_format_stat_one_value():
    assert format_stat([0.5]) == '0.500'
    assert format_stat([0.5, None]) == '0.500'


@pytest.mark.parametrize('name', ['baseline', 'batch_size', 'layernorm_batch_size'])
def test_plot_integer_ticks(name, digits, quick_results):
    results = quick_results.get(name) or [
        execute_run(run, digits) for run in plan_runs(name, seeds=[0], quick=True)]
    fig = plot_experiment(name, results)
    fig.draw_without_rendering()
    axes = [ax for ax in fig.axes if ax.get_xlabel().startswith(('epoch', 'iteration'))]
    assert axes, f'{name}: no epoch or iteration axis'
    for ax in axes:
        ticks = ax.get_xticks()
        assert np.array_equal(ticks, np.round(ticks)), f'{name}: {ax.get_xlabel()} ticks {ticks}'


def test_plot_weight_scale_styles_differ(quick_results):
    fig = plot_experiment('weight_scale', quick_results['weight_scale'])
    for ax in fig.axes:
        styles = {line.get_label().split(' (')[0]: (line.get_marker(), line.get_linestyle())
                  for line in ax.get_lines() if 'diverged' not in line.get_label()}
        assert set(styles) == {'baseline', 'batch norm'}
        assert styles['baseline'][0] != styles['batch norm'][0], 'markers are the same'
        assert styles['baseline'][1] != styles['batch norm'][1], 'line styles are the same'
