"""Tests of bnnorm.solver: the network's state, the Solver's input checks and per-step checks,
divergence handling, checkpoints and exact resuming, and precise batch-norm statistics."""
import copy
import math
import os
import re

import numpy as np
import pytest

from bnnorm.solver import (FullyConnectedNet, Solver, adam, load_checkpoint,
                           precise_batchnorm_statistics, rmsprop, sgd, sgd_momentum)


def make_blobs(num_samples=300, num_classes=4, dim=12, seed=0):
    "Return a data dict of Gaussian blobs, one per class: 4/5 for training, 1/5 for validation."
    rng = np.random.default_rng(seed)
    centres = 3 * rng.normal(size=(num_classes, dim))
    y = rng.integers(0, num_classes, size=num_samples)
    X = centres[y] + rng.normal(size=(num_samples, dim))
    split = num_samples * 4 // 5
    return {"X_train": X[:split], "y_train": y[:split], "X_val": X[split:], "y_val": y[split:]}


def make_net(normalization=None, **kwargs):
    "Build a small net for the blobs: input 12, hidden [16, 8], 4 classes."
    options = dict(input_dim=12, num_classes=4, normalization=normalization, seed=0)
    options.update(kwargs)
    return FullyConnectedNet([16, 8], **options)


@pytest.fixture
def data():
    return make_blobs()


def quiet_solver(model, data, **kwargs):
    "Build a Solver with verbose=False and seed 0 unless kwargs say otherwise."
    options = dict(verbose=False, seed=0, batch_size=20, num_epochs=2)
    options.update(kwargs)
    return Solver(model, data, **options)


# The network


def test_net_initial_parameters():
    net = FullyConnectedNet([200, 100], input_dim=300, normalization="batchnorm",
                            weight_scale=0.05, dtype=np.float64, seed=0)
    for l in (1, 2, 3):
        assert abs(net.params[f"W{l}"].std() / 0.05 - 1) < 0.05
        assert abs(net.params[f"W{l}"].mean()) < 0.01
        assert not net.params[f"b{l}"].any()
    for l in (1, 2):
        assert np.all(net.params[f"gamma{l}"] == 1)
        assert not net.params[f"beta{l}"].any()
    assert "gamma3" not in net.params


def test_net_l2_penalty_on_weights_only(data):
    X, y = data["X_train"][:10], data["y_train"][:10]
    plain = make_net("batchnorm", dtype=np.float64)
    regularized = make_net("batchnorm", dtype=np.float64, reg=0.7)
    loss0, grads0 = plain.loss(X, y)
    loss1, grads1 = regularized.loss(X, y)

    penalty = 0.5 * 0.7 * sum(np.sum(plain.params[f"W{l}"] ** 2) for l in (1, 2, 3))
    assert loss1 == pytest.approx(loss0 + penalty, rel=1e-12)
    for name in plain.params:
        expected = grads0[name] + (0.7 * plain.params[name] if name.startswith("W") else 0)
        np.testing.assert_allclose(grads1[name], expected, rtol=1e-12, atol=1e-15)


def test_net_float32_stays_float32(data):
    net = make_net("layernorm")
    loss, grads = net.loss(data["X_train"][:10], data["y_train"][:10])
    assert isinstance(loss, float)
    for name, grad in grads.items():
        assert grad.dtype == np.float32, name
    assert net.loss(data["X_val"]).dtype == np.float32


def test_net_sets_mode_from_labels(data):
    net = make_net("batchnorm")
    net.loss(data["X_train"][:10], data["y_train"][:10])
    assert [p["mode"] for p in net.norm_params] == ["train", "train"]
    net.loss(data["X_train"][:10])
    assert [p["mode"] for p in net.norm_params] == ["test", "test"]


def test_net_norm_options_copied(data):
    net = make_net("batchnorm", norm_options={"momentum": None})
    net.loss(data["X_train"][:10], data["y_train"][:10])
    net.loss(data["X_train"][10:17], data["y_train"][10:17])
    for norm_param in net.norm_params:
        assert norm_param["momentum"] is None
        assert norm_param["running_count"] == 17


def test_state_dict_exact_mode_roundtrip(data):
    net = make_net("batchnorm", norm_options={"momentum": None})
    net.loss(data["X_train"][:30], data["y_train"][:30])
    state = net.state_dict()
    assert int(state["running_count1"]) == 30
    scores = net.loss(data["X_val"])

    net.loss(data["X_train"][30:90], data["y_train"][30:90])
    net.params["W2"] *= 2
    net.load_state_dict(state)
    assert net.norm_params[0]["running_count"] == 30
    np.testing.assert_array_equal(net.loss(data["X_val"]), scores)

    state["W1"][0, 0] += 1
    assert net.params["W1"][0, 0] != state["W1"][0, 0], "load_state_dict must copy the arrays"


def test_state_before_training_resets_stats(data):
    net = make_net("batchnorm")
    initial = net.state_dict()
    assert not any(key.startswith("running_") for key in initial)
    net.loss(data["X_train"][:30] + 5, data["y_train"][:30])
    net.load_state_dict(initial)
    assert not any(key.startswith("running_") for p in net.norm_params for key in p)


def test_load_state_dict_rejects_mismatch():
    net = make_net("batchnorm")
    state = net.state_dict()
    with pytest.raises(ValueError, match=r"missing the parameters \['b3'\]"):
        net.load_state_dict({k: v for k, v in state.items() if k != "b3"})
    with pytest.raises(ValueError, match=r"state\['W2'\] has shape \(8, 16\)"):
        net.load_state_dict({**state, "W2": state["W2"].T})
    with pytest.raises(ValueError, match="dtype float64, but the parameter has shape .* float32"):
        net.load_state_dict({**state, "b1": state["b1"].astype(np.float64)})
    with pytest.raises(ValueError, match="'bias1'"):
        net.load_state_dict({**state, "bias1": state["b1"]})


def test_net_rejects_bad_input(data):
    net = make_net()
    with pytest.raises(ValueError, match=r"X has shape \(10, 11\).*input_dim = 12"):
        net.loss(data["X_train"][:10, :11])
    with pytest.raises(ValueError, match="labels outside"):
        net.loss(data["X_train"][:3], np.array([0, 1, 4]))
    with pytest.raises(ValueError, match="num_classes"):
        FullyConnectedNet([4], num_classes=0)
    with pytest.raises(ValueError, match="reg"):
        FullyConnectedNet([4], reg=-1.0)


def test_net_rejects_non_numeric_arguments():
    with pytest.raises(TypeError, match=r"reg='0\.1' is invalid; a finite number >= 0"):
        FullyConnectedNet([4], reg="0.1")
    with pytest.raises(TypeError, match="reg=True is invalid"):
        FullyConnectedNet([4], reg=True)
    with pytest.raises(TypeError, match="weight_scale=None is invalid"):
        FullyConnectedNet([4], weight_scale=None)
    with pytest.raises(ValueError, match="input_dim=True is invalid"):
        FullyConnectedNet([4], input_dim=True)


def test_net_accepts_numpy_scalars(data):
    net = FullyConnectedNet([np.int64(16)], input_dim=np.int32(12), num_classes=np.int64(4),
                            reg=np.float32(0.1), weight_scale=np.float64(1e-2), seed=0)
    loss, grads = net.loss(data["X_train"][:10], data["y_train"][:10])
    assert math.isfinite(loss)
    assert grads["W1"].shape == (12, 16)


def test_net_rejects_object_input(data):
    net = make_net()
    with pytest.raises(TypeError, match="X has dtype object, but a numeric array"):
        net.loss(data["X_train"][:10].astype(object))
    with pytest.raises(TypeError, match="X has dtype complex128"):
        net.loss(data["X_train"][:10].astype(complex))


@pytest.mark.parametrize("normalization, options, message", [
    ("batchnorm", {"momentun": 0.9}, "norm_options has the unknown key 'momentun' for "
                                     "normalization='batchnorm'; the accepted keys are "
                                     "'eps', 'momentum', 'unbiased'"),
    ("batchnorm", {"mode": "test"}, "unknown key 'mode'"),
    ("batchnorm", {"running_mean": np.zeros(16)}, "unknown key 'running_mean'"),
    ("layernorm", {"momentum": 0.9}, "unknown key 'momentum' for normalization='layernorm'; "
                                     "the accepted keys are 'eps'"),
    (None, {"eps": 1e-3}, "norm_options={'eps': 0.001} is set, but normalization=None"),
])
def test_net_rejects_bad_norm_options(normalization, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_net(normalization, norm_options=options)


def test_net_norm_options_not_dict():
    with pytest.raises(TypeError, match="norm_options is list, but a dict"):
        make_net("batchnorm", norm_options=[("eps", 1e-3)])


def test_net_layernorm_eps_option(data):
    net = make_net("layernorm", norm_options={"eps": 1e-3})
    assert [p["eps"] for p in net.norm_params] == [1e-3, 1e-3]
    assert make_net(None, norm_options={}).norm_params == []


# The Solver's settings and data


def test_unknown_keyword_arguments_named(data):
    with pytest.raises(TypeError) as error:
        Solver(make_net(), data, learning_rate=1e-3, epochs=3)
    message = str(error.value)
    assert "'learning_rate'" in message
    assert "'epochs' (did you mean 'num_epochs'?)" in message


def test_unknown_rule_lists_rules(data):
    with pytest.raises(ValueError, match=r"\['adam', 'rmsprop', 'sgd', 'sgd_momentum'\]"):
        Solver(make_net(), data, update_rule="nesterov")


def test_callable_rule_accepted(data):
    calls = []

    def fixed_step_sgd(w, dw, config=None):
        calls.append(w.shape)
        return (w - 0.05 * dw).astype(w.dtype), config

    solver = quiet_solver(make_net(), data, update_rule=fixed_step_sgd, num_epochs=1)
    solver.train()
    assert len(calls) == len(solver.model.params) * (240 // 20)
    assert solver.val_acc_history[-1] > solver.val_acc_history[0]


def test_optim_config_key_checked_early(data):
    with pytest.raises(ValueError, match=r"'adam' does not use the config keys \['momentum'\]"):
        Solver(make_net(), data, update_rule="adam", optim_config={"momentum": 0.9})


@pytest.mark.parametrize("name, value, message", [
    ("batch_size", 0, "batch_size=0 is invalid"),
    ("batch_size", 1000, "batch_size=1000 is larger than the 240 training samples"),
    ("num_epochs", -1, "num_epochs=-1 is invalid"),
    ("lr_decay", 1.5, r"lr_decay=1.5 is invalid; a number in \(0, 1\]"),
    ("on_divergence", "ignore", "on_divergence='ignore' is invalid"),
    ("num_train_samples", 0, "num_train_samples=0 is invalid"),
])
def test_settings_checked(data, name, value, message):
    with pytest.raises(ValueError, match=message):
        Solver(make_net(), data, **{name: value})


@pytest.mark.parametrize("name, value, error, message", [
    ("lr_decay", True, TypeError, "lr_decay=True is invalid"),
    ("lr_decay", "0.9", TypeError, "lr_decay='0.9' is invalid"),
    ("optim_config", {"learning_rate": "1e-3"}, TypeError,
     "config['learning_rate'] of update rule 'sgd' is '1e-3', but a finite real number"),
    ("optim_config", {"learning_rate": np.nan}, ValueError,
     "config['learning_rate'] of update rule 'sgd' is nan, but a finite real number"),
    ("update_rule", ["sgd"], TypeError, "update_rule=['sgd'] is invalid; pass a rule name"),
])
def test_settings_type_checked(data, name, value, error, message):
    with pytest.raises(error, match=re.escape(message)):
        Solver(make_net(), data, **{name: value})


def test_numpy_scalar_settings_accepted(data, tmp_path):
    solver = quiet_solver(make_net(), data, lr_decay=np.float32(0.9), batch_size=np.int64(20),
                          num_epochs=np.int64(1), optim_config={"learning_rate": np.float32(0.1)},
                          checkpoint_name=tmp_path / "run")
    solver.train()
    assert solver.epoch == 1
    assert math.isclose(solver.optim_configs["W1"]["learning_rate"], 0.1 * 0.9, rel_tol=1e-6)
    resumed = Solver.from_checkpoint(tmp_path / "run_epoch_1.npz", make_net(), data)
    assert math.isclose(resumed.lr_decay, 0.9, rel_tol=1e-6)
    assert resumed.batch_size == 20


def test_data_object_x(data):
    data["X_train"] = data["X_train"].astype(object)
    with pytest.raises(TypeError, match="X_train has dtype object, but a numeric array"):
        Solver(make_net(), data)


def test_data_missing_keys(data):
    del data["y_val"]
    with pytest.raises(ValueError, match=r"missing the keys \['y_val'\]"):
        Solver(make_net(), data)


def test_data_length_mismatch(data):
    data["y_train"] = data["y_train"][:-1]
    with pytest.raises(ValueError, match=r"y_train has shape \(239,\).*shape \(240,\)"):
        Solver(make_net(), data)


@pytest.mark.parametrize("split, label", [("train", 4), ("val", -1), ("val", 7)])
def test_data_labels_out_of_range(data, split, label):
    data[f"y_{split}"] = data[f"y_{split}"].copy()
    data[f"y_{split}"][3] = label
    with pytest.raises(ValueError, match=rf"y_{split} has 1 labels outside \[0, 4\).*"
                                         rf"y_{split}\[3\] = {label}"):
        Solver(make_net(), data)


def test_data_float_labels(data):
    data["y_train"] = data["y_train"].astype(np.float64)
    with pytest.raises(ValueError, match="y_train has dtype float64"):
        Solver(make_net(), data)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_data_non_finite_x(data, bad):
    data["X_val"] = data["X_val"].copy()
    data["X_val"][5, 2] = bad
    with pytest.raises(ValueError, match=r"X_val has 1 NaN or infinite values, the first at "
                                         r"index \(5, 2\)"):
        Solver(make_net(), data)


def test_data_wrong_input_dim(data):
    data["X_train"] = data["X_train"][:, :10]
    with pytest.raises(ValueError, match="X_train has shape .*input_dim = 12"):
        Solver(make_net(), data)


# Per-step checks


class GradientTampering:
    "Wrap a model and change the grads its loss returns with `tamper(grads)`."

    def __init__(self, model, tamper):
        self.model, self.tamper = model, tamper
        self.params, self.num_classes, self.input_dim = model.params, 4, 12

    def loss(self, X, y=None):
        if y is None:
            return self.model.loss(X)
        loss, grads = self.model.loss(X, y)
        self.tamper(grads)
        return loss, grads


def wide_net():
    return FullyConnectedNet([100], input_dim=12, num_classes=4, seed=0)


@pytest.mark.parametrize("tamper, message", [
    (lambda g: g.pop("b2"), r"missing keys \['b2'\], extra keys \[\]"),
    (lambda g: g.update(gamma1=g["b1"]), r"missing keys \[\], extra keys \['gamma1'\]"),
    (lambda g: g.update(b1=g["b1"][None]), r"grads\['b1'\] has shape \(1, 100\), but the "
                                           r"parameter 'b1' has shape \(100,\)"),
    (lambda g: g.update(b1=None), r"grads\['b1'\] is None, but an array of shape \(100,\)"),
    (lambda g: g.update(W2=g["W2"].tolist()), r"grads\['W2'\] is a list, but a NumPy array "
                                               r"of shape \(100, 4\)"),
])
def test_grads_mismatch_raises(data, tamper, message):
    net = wide_net()
    before = {name: value.copy() for name, value in net.params.items()}
    solver = quiet_solver(GradientTampering(net, tamper), data)
    with pytest.raises((ValueError, TypeError), match=message):
        solver.train()
    for name, value in before.items():
        assert np.array_equal(net.params[name], value), f"{name} changed before the error"
        assert net.params[name].shape == value.shape


def rule_returning(result_of):
    "Build an update rule that returns result_of(w, dw, config)."
    def bad_rule(w, dw, config=None):
        return result_of(w, dw, config)
    return bad_rule


def unfinished_rule(w, dw, config=None):
    next_w = w - 0.01 * dw  # noqa: F841 (the missing return is the point of this test)


@pytest.mark.parametrize("rule, error, message", [
    (unfinished_rule, TypeError, "update rule 'unfinished_rule' for parameter 'W1' returned "
                                 "None, which usually means that the rule is unfinished or "
                                 "lacks a return statement"),
    (rule_returning(lambda w, dw, c: (None, c)), TypeError, "returned None as next_w"),
    (rule_returning(lambda w, dw, c: (w.tolist(), c)), TypeError,
     "returned next_w of type list, but a NumPy array of shape (12, 16) and dtype float32"),
    (rule_returning(lambda w, dw, c: (w.ravel(), c)), ValueError,
     "returned next_w of shape (192,), but the parameter has shape (12, 16)"),
    (rule_returning(lambda w, dw, c: (w.astype(np.float64), c)), TypeError,
     "returned next_w of dtype float64, but the parameter has dtype float32"),
    (rule_returning(lambda w, dw, c: w), TypeError, "returned ndarray, but a pair"),
    (rule_returning(lambda w, dw, c: (w, "lr")), TypeError, "returned config of type str"),
])
def test_bad_update_result_raises(data, rule, error, message):
    solver = quiet_solver(make_net(), data, update_rule=rule)
    with pytest.raises(error, match=re.escape(message)):
        solver.train()
    assert solver.loss_history == [], "the error must come before the first step ends"


class LossReplacing(GradientTampering):
    "Wrap a model and return replace(loss) in place of the loss its training loss returns."

    def __init__(self, model, replace):
        super().__init__(model, lambda grads: None)
        self.replace = replace

    def loss(self, X, y=None):
        if y is None:
            return self.model.loss(X)
        loss, grads = self.model.loss(X, y)
        return self.replace(loss), grads


@pytest.mark.parametrize("replace, message", [
    (lambda loss: np.full(20, loss), "the model's loss returned a loss of type ndarray with "
                                     "shape (20,), but a real scalar is expected"),
    (lambda loss: str(loss), "the model's loss returned a loss of type str"),
])
def test_non_scalar_loss_raises(data, replace, message):
    solver = quiet_solver(LossReplacing(wide_net(), replace), data)
    with pytest.raises(TypeError, match=re.escape(message)):
        solver.train()


def test_loss_not_a_pair_raises(data):
    model = GradientTampering(wide_net(), lambda grads: None)
    model.loss = lambda X, y=None: model.model.loss(X) if y is None else 1.0
    with pytest.raises(TypeError, match=r"returned float, but a pair \(loss, grads\)"):
        quiet_solver(model, data).train()


def test_failed_update_changes_nothing(data):
    # Each step calls the rule for W1, b1, W2, b2, W3, b3, so call 14 is b1 in the third step.
    num_params, failing_call = 6, 6 * 2 + 2

    def momentum_failing_on_b1(w, dw, config=None):
        calls.append(w.shape)
        if len(calls) == failing_call:
            return None
        return sgd_momentum(w, dw, config)

    calls, snapshots = [], []
    net = make_net()
    solver = quiet_solver(net, data, update_rule=momentum_failing_on_b1)
    training_loss = net.loss

    def recording_loss(X, y=None):
        if y is not None:
            params = {name: value.copy() for name, value in net.params.items()}
            snapshots.append((params, copy.deepcopy(solver.optim_configs)))
        return training_loss(X, y)

    net.loss = recording_loss
    with pytest.raises(TypeError, match="for parameter 'b1' returned None"):
        solver.train()
    assert len(net.params) == num_params
    assert calls[failing_call - 1] == (16,), "the rule must fail on b1, after the rule for W1 ran"
    params_before, configs_before = snapshots[-1]
    for name, value in params_before.items():
        assert np.array_equal(net.params[name], value), f"{name} changed by the failed step"
    assert sorted(solver.optim_configs) == sorted(configs_before)
    for name, config in configs_before.items():
        assert sorted(solver.optim_configs[name]) == sorted(config), name
        for key, value in config.items():
            assert np.array_equal(solver.optim_configs[name][key], value), f"{name}[{key!r}]"


# Training loop


class BatchRecorder:
    "A linear model whose loss records the sample ids (column 0 of X) of each training batch."

    def __init__(self):
        self.params = {"W": np.zeros((2, 3))}
        self.num_classes, self.input_dim, self.batches = 3, 2, []

    def loss(self, X, y=None):
        if y is None:
            return X @ self.params["W"]
        self.batches.append(X[:, 0].astype(int).tolist())
        return 1.0, {"W": np.zeros((2, 3))}


def test_check_accuracy_rejects_bad_samples(data):
    solver = quiet_solver(make_net(), data)
    with pytest.raises(ValueError, match=r"X has shape \(0, 12\), so no samples, but "
                                         r"check_accuracy needs at least one"):
        solver.check_accuracy(data["X_val"][:0], data["y_val"][:0])
    with pytest.raises(ValueError, match=r"y has shape \(59,\), but X has 60 samples"):
        solver.check_accuracy(data["X_val"], data["y_val"][:-1])
    with pytest.raises(ValueError, match="num_samples=0 is invalid"):
        solver.check_accuracy(data["X_val"], data["y_val"], num_samples=0)


def test_minibatches_without_replacement():
    ids = np.arange(103, dtype=np.float64)
    data = {"X_train": np.stack([ids, ids], axis=1), "y_train": np.zeros(103, np.int64),
            "X_val": np.zeros((5, 2)), "y_val": np.zeros(5, np.int64)}
    model = BatchRecorder()
    Solver(model, data, batch_size=10, num_epochs=3, verbose=False, seed=0).train()

    assert len(model.batches) == 3 * 10
    epochs = [sum(model.batches[10 * e:10 * (e + 1)], []) for e in range(3)]
    for epoch in epochs:
        assert len(epoch) == 100
        assert len(set(epoch)) == 100, "a sample was drawn twice in one epoch"
    assert epochs[0] != epochs[1], "each epoch needs a fresh permutation"


def test_histories_and_lr_decay(data):
    solver = quiet_solver(make_net(), data, update_rule="sgd_momentum", lr_decay=0.5,
                          num_epochs=3, optim_config={"learning_rate": 0.02})
    solver.train()
    assert len(solver.loss_history) == 3 * 12
    assert len(solver.train_acc_history) == 4
    assert len(solver.val_acc_history) == 4
    for config in solver.optim_configs.values():
        assert config["learning_rate"] == pytest.approx(0.02 * 0.5**3, rel=1e-15)
        assert config["momentum"] == 0.9


def test_best_model_restored(data):
    net = make_net("batchnorm")
    solver = quiet_solver(net, data, update_rule="adam", optim_config={"learning_rate": 0.02},
                          num_epochs=4, num_val_samples=None)
    solver.train()
    assert solver.best_val_acc == max(solver.val_acc_history)
    for name, value in solver.best_state.items():
        assert np.array_equal(net.state_dict()[name], value), name
    assert solver.check_accuracy(data["X_val"], data["y_val"]) == solver.best_val_acc


def test_same_seed_same_result(data):
    results = []
    for _ in range(2):
        net = make_net("batchnorm")
        quiet_solver(net, data, update_rule="adam", num_train_samples=50).train()
        results.append(net.state_dict())
    for name in results[0]:
        assert np.array_equal(results[0][name], results[1][name]), name


def test_verbose_summary_lines(data, capsys):
    solver = Solver(make_net(), data, update_rule="sgd", batch_size=20, num_epochs=10, seed=0)
    solver.train()
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 11
    assert lines[0].startswith("epoch  0/10  loss         -  train acc ")
    assert lines[10].startswith("epoch 10/10  loss ")
    assert len({len(line) for line in lines}) == 1, "summary lines must have a fixed width"
    assert "step" in captured.err, "the progress bar goes to stderr"


def test_quiet_prints_nothing(data, capsys):
    quiet_solver(make_net(), data).train()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""


# Divergence


def exploding_net():
    return FullyConnectedNet([64, 64], input_dim=12, num_classes=4, weight_scale=1e3, seed=0)


def test_divergence_raises_with_location(data):
    solver = quiet_solver(exploding_net(), data, optim_config={"learning_rate": 1e3})
    with pytest.raises(FloatingPointError,
                       match=r"became (nan|inf) at epoch 1, iteration \d+ of 12 .*lower the "
                             r"learning rate or the weight scale"):
        solver.train()


def test_divergence_recorded(data):
    net = exploding_net()
    solver = quiet_solver(net, data, optim_config={"learning_rate": 1e3}, num_epochs=5,
                          on_divergence="record")
    solver.train()
    assert solver.diverged
    assert not math.isfinite(solver.loss_history[-1])
    assert all(math.isfinite(loss) for loss in solver.loss_history[:-1])
    assert len(solver.val_acc_history) == solver.epoch + 1
    for name, value in net.params.items():
        assert np.isfinite(value).all(), f"{name} must hold the best finite state"


class NaNLossAt:
    "Wrap a model so that training call number `step` returns a NaN loss with finite grads."

    def __init__(self, model, step):
        self.model, self.step, self.calls = model, step, 0
        self.params, self.num_classes, self.input_dim = model.params, 4, 12

    def loss(self, X, y=None):
        if y is None:
            return self.model.loss(X)
        self.calls += 1
        loss, grads = self.model.loss(X, y)
        return (math.nan if self.calls == self.step else loss), grads


def test_divergence_skips_update(data):
    solver = quiet_solver(NaNLossAt(make_net(), step=3), data, update_rule="adam",
                          on_divergence="record")
    solver.train()
    assert solver.diverged
    assert len(solver.loss_history) == 3
    assert solver.epoch == 0
    for name, config in solver.optim_configs.items():
        assert config["t"] == 2, f"{name} was updated at the step whose loss was NaN"


# Checkpoints and resuming


def test_checkpoint_files_and_contents(data, tmp_path):
    name = tmp_path / "runs" / "blobs"
    name.parent.mkdir()
    solver = quiet_solver(make_net("batchnorm"), data, update_rule="adam", checkpoint_name=name)
    solver.train()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "blobs_epoch_1.npz", "blobs_epoch_2.npz"]

    meta, arrays = load_checkpoint(tmp_path / "runs" / "blobs_epoch_2.npz")
    assert meta["epoch"] == 2
    assert len(meta["loss_history"]) == 24
    assert meta["optim_scalars"]["W1"]["t"] == 24
    assert "model/running_mean1" in arrays
    assert "best/W1" in arrays
    assert "optim/W1/m" in arrays
    assert meta["batch_rng"]["bit_generator"] == "PCG64"


def test_checkpoint_write_is_atomic(data, tmp_path, monkeypatch):
    name = tmp_path / "blobs"
    replacements, real_replace = [], os.replace

    def recording_replace(source, destination):
        replacements.append((os.fspath(source), os.fspath(destination)))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", recording_replace)
    solver = quiet_solver(make_net(), data, checkpoint_name=name, num_epochs=1)
    solver.train()
    assert len(replacements) == 1
    source, destination = replacements[0]
    assert destination == os.fspath(tmp_path / "blobs_epoch_1.npz")
    assert os.path.dirname(source) == os.fspath(tmp_path)
    assert os.path.basename(source).startswith(".blobs_epoch_1.npz.")
    first = (tmp_path / "blobs_epoch_1.npz").read_bytes()

    def failing_savez(file, **arrays):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        solver.save_checkpoint()
    assert (tmp_path / "blobs_epoch_1.npz").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs_epoch_1.npz"]


class Interrupt(Exception):
    "An exception that simulates a KeyboardInterrupt in the middle of training."


def interrupting(rule, after_calls):
    "Wrap `rule` so that it raises Interrupt on call number `after_calls` + 1."
    calls = [0]

    def rule_until_interrupt(w, dw, config=None):
        calls[0] += 1
        if calls[0] > after_calls:
            raise Interrupt
        return rule(w, dw, config)
    return rule_until_interrupt


@pytest.mark.parametrize("norm_options", [{"momentum": 0.9}, {"momentum": None}])
def test_resume_after_interrupt_matches(data, tmp_path, norm_options):
    # Noise makes the classes overlap, so the training accuracy on a random subset of 50
    # samples depends on which subset the restored sample generator draws.
    noise = np.random.default_rng(5).normal(scale=3.0, size=data["X_train"].shape)
    data = {**data, "X_train": data["X_train"] + noise}
    settings = dict(update_rule=sgd_momentum, optim_config={"learning_rate": 0.05},
                    lr_decay=0.9, num_epochs=4, num_train_samples=50)
    uninterrupted = make_net("batchnorm", norm_options=norm_options)
    reference = quiet_solver(uninterrupted, data, **settings)
    reference.train()

    interrupted = make_net("batchnorm", norm_options=norm_options)
    num_params = len(interrupted.params)
    settings["update_rule"] = interrupting(sgd_momentum, after_calls=num_params * (2 * 12 + 5))
    with pytest.raises(Interrupt):
        quiet_solver(interrupted, data, checkpoint_name=tmp_path / "run", **settings).train()

    fresh = make_net("batchnorm", norm_options=norm_options, seed=123)
    resumed = Solver.from_checkpoint(tmp_path / "run_epoch_2.npz", fresh, data,
                                     update_rule=sgd_momentum, verbose=False)
    assert resumed.epoch == 2
    resumed.train()

    expected = uninterrupted.state_dict()
    assert sorted(fresh.state_dict()) == sorted(expected)
    for name, value in fresh.state_dict().items():
        assert np.array_equal(value, expected[name]), f"{name} differs after resuming"
    assert resumed.loss_history == reference.loss_history
    assert resumed.train_acc_history == reference.train_acc_history
    assert resumed.val_acc_history == reference.val_acc_history
    assert resumed.best_val_acc == reference.best_val_acc
    assert len(set(reference.train_acc_history[2:])) > 1, "the accuracies must vary per subset"


def test_resume_with_more_epochs(data, tmp_path):
    reference_net = make_net("batchnorm")
    quiet_solver(reference_net, data, update_rule="adam", num_epochs=4).train()

    net = make_net("batchnorm")
    quiet_solver(net, data, update_rule="adam", num_epochs=2,
                 checkpoint_name=tmp_path / "run").train()
    resumed = Solver.from_checkpoint(tmp_path / "run_epoch_2.npz", make_net("batchnorm"), data,
                                     num_epochs=4, verbose=False)
    assert resumed.rule_name == "adam"
    assert resumed.batch_size == 20
    resumed.train()
    for name, value in resumed.model.state_dict().items():
        assert np.array_equal(value, reference_net.state_dict()[name]), name
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"run_epoch_{k}.npz" for k in (1, 2, 3, 4)]


def test_resume_custom_rule_needs_callable(data, tmp_path):
    def plain(w, dw, config=None):
        return sgd(w, dw, config)

    quiet_solver(make_net(), data, update_rule=plain, num_epochs=1,
                 checkpoint_name=tmp_path / "run").train()
    with pytest.raises(ValueError, match="custom update rule 'plain'; pass it again"):
        Solver.from_checkpoint(tmp_path / "run_epoch_1.npz", make_net(), data)


def test_resume_rejects_bad_files(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_epoch_1.npz"):
        Solver.from_checkpoint(tmp_path / "nothing_epoch_1.npz", make_net(), data)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="is not a Solver checkpoint"):
        Solver.from_checkpoint(tmp_path / "other.npz", make_net(), data)

    quiet_solver(make_net(), data, num_epochs=1, checkpoint_name=tmp_path / "run").train()
    with pytest.raises(ValueError, match=r"state\['W1'\] has shape \(12, 16\)"):
        Solver.from_checkpoint(tmp_path / "run_epoch_1.npz",
                               FullyConnectedNet([5], input_dim=12, num_classes=4), data)


# Precise batch-norm statistics


def layer_inputs(net, X):
    "Return the input of each batch-norm layer over all of X at once, in float64."
    h, inputs = X.reshape(len(X), -1).astype(np.float64), []
    for l, bn_param in enumerate(net.norm_params, start=1):
        a = h @ net.params[f"W{l}"].astype(np.float64) + net.params[f"b{l}"]
        inputs.append(a)
        std = np.sqrt(bn_param["running_var"] + bn_param["eps"])
        h = np.maximum(0, net.params[f"gamma{l}"] * (a - bn_param["running_mean"]) / std
                       + net.params[f"beta{l}"])
    return inputs


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_precise_statistics_match_full_pass(data, batch_size):
    net = FullyConnectedNet([16, 8, 8], input_dim=12, num_classes=4, normalization="batchnorm",
                            dtype=np.float64, seed=0)
    quiet_solver(net, data, update_rule="adam", batch_size=5).train()
    weights = {name: value.copy() for name, value in net.params.items()}
    for norm_param in net.norm_params:
        norm_param["mode"] = "train"

    assert precise_batchnorm_statistics(net, data["X_train"], batch_size=batch_size) is net
    for l, a in enumerate(layer_inputs(net, data["X_train"]), start=1):
        np.testing.assert_allclose(net.norm_params[l - 1]["running_mean"], a.mean(axis=0),
                                   rtol=1e-10, atol=1e-12, err_msg=f"running_mean{l}")
        np.testing.assert_allclose(net.norm_params[l - 1]["running_var"], a.var(axis=0),
                                   rtol=1e-10, err_msg=f"running_var{l}")
    for name, value in weights.items():
        assert np.array_equal(net.params[name], value), name
    assert [p["mode"] for p in net.norm_params] == ["train"] * 3


def test_precise_statistics_unbiased_and_exact(data):
    net = make_net("batchnorm", dtype=np.float64,
                   norm_options={"momentum": None, "unbiased": True})
    quiet_solver(net, data, num_epochs=1).train()
    precise_batchnorm_statistics(net, data["X_train"][:100], batch_size=30)
    inputs = layer_inputs(net, data["X_train"][:100])
    for l, a in enumerate(inputs, start=1):
        bn_param = net.norm_params[l - 1]
        np.testing.assert_allclose(bn_param["running_var"], a.var(axis=0, ddof=1), rtol=1e-10)
        assert bn_param["running_count"] == 100
        assert not np.any(bn_param["running_mean_compensation"])

    net.loss(data["X_train"][100:140], data["y_train"][100:140])
    assert net.norm_params[0]["running_count"] == 140


def test_precise_statistics_float32_net(data):
    net = make_net("batchnorm")
    quiet_solver(net, data, num_epochs=1).train()
    precise_batchnorm_statistics(net, data["X_train"], batch_size=64)
    a = layer_inputs(net, data["X_train"].astype(np.float32))[0]
    np.testing.assert_allclose(net.norm_params[0]["running_mean"], a.mean(axis=0),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(net.norm_params[0]["running_var"], a.var(axis=0), rtol=1e-4)


def test_precise_statistics_rejects_other_nets(data):
    with pytest.raises(ValueError, match="'layernorm', but precise statistics exist only for"):
        precise_batchnorm_statistics(make_net("layernorm"), data["X_train"])
    with pytest.raises(ValueError, match="batch_size=0 is invalid"):
        precise_batchnorm_statistics(make_net("batchnorm"), data["X_train"], batch_size=0)
    unbiased = make_net("batchnorm", norm_options={"unbiased": True})
    with pytest.raises(ValueError, match="X has 1 sample, but the unbiased variance"):
        precise_batchnorm_statistics(unbiased, data["X_train"][:1])


# Input checks of the update rules, the network and checkpoints


@pytest.mark.parametrize("rule", [sgd, sgd_momentum, rmsprop, adam])
def test_rule_rejects_integer_w(rule):
    with pytest.raises(TypeError, match="w of dtype int64"):
        rule(np.array([1, 1, 1]), np.ones(3))


@pytest.mark.parametrize("rule, key, value", [
    (sgd, "learning_rate", -1), (sgd, "learning_rate", 0), (sgd_momentum, "momentum", -1),
    (sgd_momentum, "momentum", 1), (rmsprop, "decay_rate", 2), (rmsprop, "epsilon", 0),
    (adam, "beta1", 1), (adam, "beta2", -0.5), (adam, "epsilon", -1e-8)])
def test_rule_setting_out_of_range(rule, key, value):
    with pytest.raises(ValueError, match=rf"config\['{key}'\] .* is {value}, outside"):
        rule(np.ones(2), np.ones(2), {key: value})


def test_solver_rejects_out_of_range_config(data):
    with pytest.raises(ValueError, match=r"config\['momentum'\]"):
        quiet_solver(make_net(), data, update_rule="sgd_momentum", optim_config={"momentum": 1.5})


@pytest.mark.parametrize("kwargs, error, fragment", [
    ({"hidden_dims": 5}, TypeError, "hidden_dims=5 is invalid"),
    ({"hidden_dims": [5], "num_classes": 1}, ValueError, "num_classes=1 is invalid"),
    ({"hidden_dims": [5], "normalization": "batchnorm", "norm_options": {"eps": -1}},
     ValueError, "norm_options=.*eps.* is invalid"),
    ({"hidden_dims": [5], "normalization": "batchnorm", "norm_options": {"momentum": 2}},
     ValueError, "norm_options=.*momentum.* is invalid"),
    ({"hidden_dims": [5], "normalization": "layernorm", "norm_options": {"eps": 0}},
     ValueError, "norm_options=.*eps.* is invalid"),
])
def test_net_rejects_invalid_arguments(kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        FullyConnectedNet(**kwargs)


def test_checkpoint_missing_folder_not_created(data, tmp_path):
    name = tmp_path / "missing" / "run"
    with pytest.raises(FileNotFoundError, match="checkpoint folder .*missing.* does not exist"):
        quiet_solver(make_net(), data, num_epochs=1, checkpoint_name=name)
    assert not (tmp_path / "missing").exists()


def test_checkpoint_mode_follows_umask(data, tmp_path):
    old_umask = os.umask(0o022)
    try:
        quiet_solver(make_net(), data, num_epochs=1, checkpoint_name=tmp_path / "run").train()
    finally:
        os.umask(old_umask)
    assert (tmp_path / "run_epoch_1.npz").stat().st_mode & 0o777 == 0o644


def test_load_checkpoint_text_file(tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match="is not a Solver checkpoint: it is not an .npz archive"):
        load_checkpoint(text_file)
