"""End-to-end: fit on a tiny synthetic MNIST, the CLI's errors and exit codes, the outputs."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import FINISHED_RUN, load_cli

from cgmq_jax import certify, cost, data, models, repair, report, train

ROOT = Path(__file__).resolve().parents[1]
LENET_MACS = 281640


pytestmark = pytest.mark.usefixtures("standard_promotion_fixture")  # optax.adam


@pytest.mark.slow
def test_fit_returns_a_certified_model_within_budget(tiny_mnist):
    config = train.TrainConfig(budget_bops=2e6, epochs=1, pretrain_epochs=1, batch_size=64)
    result = train.fit(config, tiny_mnist, log=lambda _: None)
    certificate = result.certificate
    specs = cost.layer_specs(models.LeNet5(), tiny_mnist.train[0][:1])
    assert certificate["within_budget"]
    assert certificate["bops"] == cost.exact_bops(result.params, specs) <= 2e6
    assert sum(row["bops"] for row in certificate["layers"]) == certificate["bops"]
    assert 0.0 <= result.test_accuracy <= 1.0
    assert [row["phase"] for row in result.history] == ["float", "qat"]
    fill = certificate["fill"]  # the bits that fit, their weights trained, unless worse
    assert fill["bits"] > 0 and fill["tune_epochs"] == config.fill_epochs == 1
    lost, won = fill["val_lost"], fill["val_won"]
    n = len(tiny_mnist.validation[1])  # the images each network gets right, counted twice:
    moved = round((fill["val_accuracy_after"] - fill["val_accuracy_before"]) * n)
    assert won - lost == moved  # the trained filled network's against the one as trained
    assert fill["kept"] == (lost - won <= 2.0 * (lost + won) ** 0.5)
    assert fill["tuned"] == fill["kept"]  # its weight training did not diverge
    if fill["kept"]:  # then no single bit fits any more: training moved no quantizer
        assert certificate["bops"] + certificate["one_more_bit_bops"] > 2e6


def test_repair_makes_an_over_budget_model_feasible(lenet_init_params):
    model = models.LeNet5()
    x = np.zeros((1, 28, 28, 1), np.float32)
    params = lenet_init_params  # jax.jit(model.init)(jax.random.key(0), x)["params"]
    specs = cost.layer_specs(model, x)
    assert cost.exact_bops(params, specs) == LENET_MACS * 64
    repaired, removed = repair.greedy_repair(params, specs, 1e6)
    assert cost.exact_bops(repaired, specs) <= 1e6
    assert 0 < removed <= 10 * 7  # at most the bits above the floors
    assert certify.certify(repaired, specs, 1e6)["within_budget"]
    with pytest.raises(AssertionError, match="certificate refused"):
        certify.certify(params, specs, 1e6)


@pytest.mark.parametrize("budget", [1e6, 2e6])
def test_fill_uses_the_budget_until_no_single_bit_fits(budget, lenet_init_params):
    model = models.LeNet5()
    x = np.zeros((1, 28, 28, 1), np.float32)
    params = lenet_init_params  # jax.jit(model.init)(jax.random.key(0), x)["params"]
    specs = cost.layer_specs(model, x)
    low, _ = repair.greedy_repair(params, specs, budget * 0.6)  # well within the budget
    filled, added = repair.greedy_fill(low, specs, budget)
    report = certify.certify(filled, specs, budget)  # within, or refused
    before, after = cost.layer_table(low, specs), report["layers"]
    gained = sum(
        a["weight_bits"] - b["weight_bits"] + a["input_bits"] - b["input_bits"]
        for a, b in zip(after, before, strict=True)
    )
    assert added == gained > 0
    assert all(  # only ever more bits
        a["weight_bits"] >= b["weight_bits"] and a["input_bits"] >= b["input_bits"]
        for a, b in zip(after, before, strict=True)
    )
    assert report["bops"] + report["one_more_bit_bops"] > budget  # no single bit fits now
    assert report["bops"] >= 0.97 * budget
    assert repair.greedy_fill(filled, specs, budget)[1] == 0  # a fixed point


def test_the_fill_drops_a_filled_network_worse_beyond_chance(lenet_init_params, tiny_mnist):
    """The filled network is kept unless it loses more validation images than chance
    explains (McNemar, z = 2): here its weight training returns a network that calls every
    image one class, against labels the network as trained gets all right."""
    from types import SimpleNamespace

    from cgmq_jax.runs import fill

    model, images = models.LeNet5(), tiny_mnist.validation[0][:200]
    specs = cost.layer_specs(model, images[:1])
    params, _ = repair.greedy_repair(lenet_init_params, specs, 1.2e6)  # room to fill
    labels = np.argmax(np.asarray(model.apply({"params": params}, images)), -1)
    setup = SimpleNamespace(model=model, specs=specs, limits=2e6, config=SimpleNamespace(
        fill_epochs=1))  # fmt: skip
    rare = int(np.argmin(np.bincount(labels, minlength=10)))

    def one_class(p):
        head = {**p["fc3"], "kernel": np.zeros_like(p["fc3"]["kernel"])}
        head["bias"] = 10.0 * np.eye(10, dtype=np.float32)[rare]
        return {**p, "fc3": head}, None

    kept, record = fill._fill(setup, params, (images, labels), lambda _: None, one_class)
    assert kept is params and not record["kept"] and not record["tuned"]
    assert record["bits"] > 0 and record["val_accuracy_before"] == 1.0
    assert (record["val_lost"], record["val_won"]) == (np.sum(labels != rare), 0)
    # A diverged weight training leaves the filled network, untrained: judged the same way.
    diverged = lambda p: (None, "the loss became nan")  # noqa: E731
    messages = []
    returned, record = fill._fill(setup, params, (images, labels), messages.append, diverged)
    assert record["val_accuracy_after"] == record["val_accuracy_filled"]
    assert not record["tuned"] and record["kept"] == (returned is not params)
    assert "the fill's weight training is dropped: the loss became nan" in messages[0]


def test_one_more_bit_bops_is_the_cheapest_single_bit(lenet_init_params):
    model = models.LeNet5()
    x = np.zeros((1, 28, 28, 1), np.float32)
    params = lenet_init_params  # jax.jit(model.init)(jax.random.key(0), x)["params"]
    specs = cost.layer_specs(model, x)
    table = cost.layer_table(params, specs)  # 8 bits everywhere
    # fc3 (840 MACs): one more weight or input bit adds 840 * 8.
    assert repair.one_more_bit_bops(specs, table) == 840 * 8
    pinned = cost.layer_specs(models.LeNet5(input_bits=8), x)
    assert pinned[0].input_bits == 8 and all(s.input_bits is None for s in pinned[1:])


def test_input_bits_pins_the_network_input_and_counts_it(lenet_init_params):
    x = np.zeros((1, 28, 28, 1), np.float32)
    specs = cost.layer_specs(models.get_model("lenet5_bb", input_bits=8), x)
    # Bayesian Bits' convention: the minimum is 14,985,216 BOPs = 0.343% of 32-bit.
    assert cost.min_cost(specs) == 14_985_216
    assert round(cost.relative_bops(cost.min_cost(specs), specs), 3) == 0.343
    learned = cost.layer_specs(models.get_model("lenet5_bb"), x)
    assert cost.min_cost(learned) == 8_534_016  # the image at 1 bit
    model = models.get_model("lenet5", input_bits=8)
    params = lenet_init_params  # the same tree: pinning the input changes the specs only
    lenet_specs = cost.layer_specs(model, x)
    report = certify.cost_report(quantizer_at_min(params), lenet_specs, 2e6)
    assert report["layers"][0]["input_bits"] == 8
    assert report["relative_bops_percent_input8"] == report["relative_bops_percent"]
    with pytest.raises(ValueError, match="--input_bits must be an integer in"):
        train.TrainConfig(input_bits=0).validate()


def quantizer_at_min(params):
    from cgmq_jax import quantizer

    return quantizer.at_min_bitwidths(params)


@pytest.mark.parametrize("budget", ["1e5", "5e5"])
def test_infeasible_budget_exits_2_and_states_the_minimum(budget, capsys):
    status = load_cli("mnist").main(
        ["--budget_bops", budget, "--data", "idx", "--data_dir", "/nope"]
    )
    message = capsys.readouterr().err
    assert status == 2
    assert "infeasible" in message and f"{LENET_MACS * 2:,}" in message
    assert f"{float(budget):,.0f}" in message


@pytest.mark.parametrize("budget", ["-1", "0", "nan", "inf"])
def test_bad_budgets_are_rejected(budget, capsys):
    status = load_cli("mnist").main(["--budget_bops", budget])
    assert status == 2
    assert "positive finite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--budget_warmup_epochs", "-1"], "in \\[0, --epochs"),
        (["--budget_warmup_epochs", "nan"], "in \\[0, --epochs"),
        (["--budget_warmup_epochs", "9", "--epochs", "8"], "in \\[0, --epochs 8\\]"),
        (["--budget_warmup_epochs", "1", "--method", "dq"], "needs --method cgmq"),
        (["--budget_warmup_epochs", "1", "--budget_weight_kib", "8"], "alone"),
    ],
)
def test_bad_budget_warmups_are_rejected(flags, fragment, capsys):
    status = load_cli("mnist").main(["--budget_bops", "2e6", *flags])
    err = capsys.readouterr().err
    assert status == 2
    assert re.search(fragment, err), err


def test_missing_data_is_a_one_line_error(tmp_path, capsys):
    status = load_cli("mnist").main(["--data", "idx", "--data_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("error:") and len(err.splitlines()) == 1


@pytest.mark.slow
@FINISHED_RUN
def test_cli_writes_results(finished_run, tiny_mnist):
    out = finished_run  # conftest's shared run: the CLI with --budget_bops 2e6 (read only)
    results = json.loads((out / "results.json").read_text())
    assert results["certificate"]["within_budget"] and results["bops"] <= 2e6
    assert results["flags"]["budget_bops"] == 2e6 and results["seed"] == 0
    assert results["versions"]["jax"]
    # the XLA options it ran with (they change a run's last bits): the suite's own
    assert results["versions"]["xla_flags"] == os.environ.get("XLA_FLAGS", "")
    assert results["versions"]["compiler_options"] is None  # LeNet-5's steps: XLA's defaults
    assert (out / "training.png").stat().st_size > 0
    params = report.load_params(out)
    specs = cost.layer_specs(models.LeNet5(), tiny_mnist.train[0][:1])
    assert cost.exact_bops(params, specs) == results["bops"]
    assert math.isfinite(results["test_accuracy"])
    parts = results["timings"]  # the wall time split: what docs/performance.md reports
    assert set(parts) == {"compile", "train", "evaluate", "other"}
    assert all(seconds >= 0 for seconds in parts.values()) and parts["train"] > 0


def test_batches_deterministic_and_epoch_dependent():
    x = np.arange(103 * 2).reshape(103, 2)
    y = np.arange(103)

    def order(**kw):
        return np.concatenate([b[1] for b in train.batches(x, y, 10, **kw)])

    a, b = order(seed=1, epoch=0), order(seed=1, epoch=0)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 100 and len(set(a.tolist())) == 100  # drop_last, no repeats
    assert not np.array_equal(a, order(seed=1, epoch=1))
    assert not np.array_equal(a, order(seed=2, epoch=0))
    full = order(seed=1, epoch=3, drop_last=False)
    assert sorted(full.tolist()) == list(range(103))
    np.testing.assert_array_equal(order(seed=0, shuffle=False, drop_last=False), y)
    for bx, by in train.batches(x, y, 7, seed=5):
        np.testing.assert_array_equal(bx[:, 0], 2 * by)  # images stay paired with labels
    assert list(train.batches(x[:5], y[:5], 10, seed=0)) == []


def test_batches_validates_arguments():
    x, y = np.zeros((4, 1)), np.zeros(4)
    with pytest.raises(ValueError, match="differ in length"):
        train.batches(x, y[:3], 2, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        train.batches(x, y, 0, seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        train.batches(x, y, 2, seed=-1)


@pytest.mark.slow
def test_cifar_shaped_model_trains_one_step():
    """CIFAR-10's 32x32x3 input goes through LeNet-5: check_config's costs, one step."""
    tiny = data.synthetic(32, 8, 8, image_shape=(32, 32, 3))
    config = train.TrainConfig(
        method="cgmq", budget_bops=2e7, epochs=1, pretrain_epochs=0, batch_size=32,
        fill_epochs=0,  # the fill's own train step is another compile, tested elsewhere
    )  # fmt: skip
    specs = train.check_config(config, tiny.image_shape)
    assert specs[0].macs > 281_640  # more than LeNet-5 on 28x28x1
    result = train.fit(config, tiny, log=lambda line: None)
    assert result.data_source == "synthetic" and np.isfinite(result.test_accuracy)


def test_accuracy_is_compiled_once_per_model(tiny_mnist):
    """Every accuracy function of one model (fit makes several: per phase, the fill, the
    test) shares one compiled program: a second compile cost 2 s per run on the CPU."""
    from cgmq_jax.runs import steps

    model = models.MLP()
    images, labels = tiny_mnist.validation[0][:64], tiny_mnist.validation[1][:64]
    params = model.init(jax.random.key(0), images[:1])["params"]
    before = steps._correct._cache_size()
    first = train.make_accuracy(model, batch_size=32)(params, images, labels)
    second = train.make_accuracy(models.MLP(), batch_size=32)(params, images, labels)
    assert first == second and 0 <= first <= 1
    assert steps._correct._cache_size() == before + 1


def test_use_compilation_cache_respects_the_environment(monkeypatch, tmp_path):
    from cgmq_jax.runs import parallel

    saved, enabled = jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("CGMQ_CACHE_DIR", str(tmp_path))
        cpus = parallel.usable_cpus()
        assert parallel.use_compilation_cache() == str(tmp_path / "xla" / f"cpus-{cpus}")
        if hasattr(os, "sched_setaffinity") and cpus > 1:  # a pinned process: its own cache
            everything = os.sched_getaffinity(0)
            jax.config.update("jax_compilation_cache_dir", None)
            try:
                os.sched_setaffinity(0, {min(everything)})
                assert parallel.use_compilation_cache() == str(tmp_path / "xla" / "cpus-1")
            finally:
                os.sched_setaffinity(0, everything)
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
        assert parallel.use_compilation_cache() == str(tmp_path / "mine")  # kept
        jax.config.update("jax_enable_compilation_cache", False)
        assert parallel.use_compilation_cache() is None
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        jax.config.update("jax_compilation_cache_dir", saved)


def test_each_model_gets_its_schedule_unless_one_is_given():
    from cgmq_jax.runs import config

    lenet = train.TrainConfig()
    assert (lenet.pretrain_epochs, lenet.epochs, lenet.lr, lenet.batch_size) == (2, 8, 2e-3, 64)
    dscnn = train.TrainConfig(model="dscnn")
    assert (dscnn.pretrain_epochs, dscnn.epochs, dscnn.lr, dscnn.batch_size) == (5, 25, 1e-3, 128)
    bb = config.schedule("lenet5_bb")  # the default one, but its rate decays under prune
    default = dataclasses.replace(
        bb, quantizer_lr_decay_with_prune=False, move_at_floor=False, compiler_options=()
    )
    assert default == config.DEFAULT_SCHEDULE  # and it compiles with its own XLA options
    assert bb.quantizer_lr_decay_with_prune and bb.move_at_floor
    assert train.TrainConfig(model="lenet5_bb").move_at_floor
    assert not lenet.move_at_floor and not dscnn.move_at_floor
    given = train.TrainConfig(model="dscnn", epochs=3, lr=5e-4, batch_size=32)
    assert (given.pretrain_epochs, given.epochs, given.lr, given.batch_size) == (5, 3, 5e-4, 32)
    schedule = {"epochs": None, "pretrain_epochs": None, "lr": None, "batch_size": None}
    schedule["microbatches"] = None
    moved = dataclasses.replace(lenet, model="dscnn", admission=None, **schedule)
    assert moved == dscnn
    lenet.validate()  # the resolved schedule passes the checks
    # The guard's admission too: gain for the DS-CNN, the schedule's under prune, or the
    # user's choice.
    assert (lenet.admission, dscnn.admission) == ("all_or_nothing", "gain")
    assert train.TrainConfig(model="dscnn", admission="within_bits").admission == "within_bits"
    assert train.TrainConfig(model="dscnn", prune=True).admission == "gain"
    assert train.TrainConfig(model="lenet5_bb", prune=True).admission == "all_or_nothing"
    train.TrainConfig(prune=True).validate()


def test_lenet5_bb_steps_compile_with_xlas_convolutions_off_ynnpack():
    """``lenet5_bb``'s schedule's XLA options reach its train steps (on this CPU): a
    convolution compiled with them is XLA's own instruction, under XLA's defaults (every
    other model) it is a YNNPACK fusion."""
    import flax.linen as nn
    import jax.numpy as jnp
    import optax
    from flax.training import train_state

    from cgmq_jax.runs import config, steps

    bb = train.TrainConfig(model="lenet5_bb")
    assert bb.compiler_options == dict(config.YNNPACK_REDUCTIONS_ONLY)
    assert train.TrainConfig().compiler_options is None
    assert train.TrainConfig(model="dscnn").compiler_options is None

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.mean(nn.Conv(64, (5, 5), padding="VALID")(x), axis=(1, 2))

    model, x = Net(), jnp.ones((8, 12, 12, 32))  # lenet5_bb's conv2, a smaller batch
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=model.init(jax.random.key(0), x)["params"], tx=optax.sgd(0.1)
    )
    labels = jnp.zeros(8, jnp.int32)

    def convolutions_in_ynnpack(options) -> bool:
        step = steps.make_train_step(model, compiler_options=options)
        hlo = step.lower(state, x, labels).compile().as_text()
        ynn = [line for line in hlo.splitlines() if "ynn_fusion" in line and "conv" in line]
        return bool(ynn)

    assert convolutions_in_ynnpack(None)
    assert not convolutions_in_ynnpack(bb.compiler_options)


def test_the_cli_stores_the_models_admission():
    """``--admission`` left out is stored as the model's: an older LeNet-5 checkpoint
    (which holds ``all_or_nothing``) resumes, and an older DS-CNN one is refused by name
    unless asked for its own."""
    from cgmq_jax.runs import rundir

    cli = load_cli("mnist")
    assert cli.run_flags(cli.parse_args([]))["admission"] == "all_or_nothing"
    dscnn = cli.run_flags(cli.parse_args(["--model", "dscnn"]))
    assert dscnn["admission"] == "gain"
    older = {**dscnn, "admission": "all_or_nothing"}
    assert rundir.changed_flags(older, dscnn) == ["admission"]
    assert cli.run_flags(cli.parse_args(["--model", "dscnn", "--prune"]))["admission"] == "gain"
    assert cli.run_flags(cli.parse_args(["--prune"]))["admission"] == "gain"  # LeNet-5's
    chosen = cli.parse_args(["--model", "dscnn", "--admission", "all_or_nothing"])
    assert cli.run_flags(chosen)["admission"] == "all_or_nothing"


def test_the_cli_stores_the_models_batch_size():
    """``--batch_size`` left out is stored as the model's (LeNet-5 64, the others 128): a
    LeNet-5 checkpoint written at the older default, 128, is refused by name, and resumes
    with ``--batch_size 128``."""
    from cgmq_jax.runs import rundir

    cli = load_cli("mnist")
    lenet = cli.run_flags(cli.parse_args([]))
    assert lenet["batch_size"] == 64
    assert cli.run_flags(cli.parse_args(["--model", "dscnn"]))["batch_size"] == 128
    older = {**lenet, "batch_size": 128}
    assert rundir.changed_flags(older, lenet) == ["batch_size"]
    given = cli.run_flags(cli.parse_args(["--batch_size", "128"]))
    assert rundir.changed_flags(older, given) == []


def test_move_at_floor_is_the_models_under_the_all_or_nothing_guard(monkeypatch):
    """``move_at_floor`` left out takes the model's schedule, but not with ``prune`` or
    another admission; given with another admission it is refused by name. The CLI stores
    it where it is on, else leaves it ``None`` (as checkpoints written before it)."""
    from cgmq_jax.runs import config, rundir

    on = dataclasses.replace(config.DEFAULT_SCHEDULE, move_at_floor=True)
    monkeypatch.setitem(config.SCHEDULES, "mlp", on)
    assert train.TrainConfig(model="mlp").move_at_floor is True
    assert train.TrainConfig(model="mlp", prune=True).move_at_floor is False
    assert train.TrainConfig(model="mlp", admission="gain").move_at_floor is False
    assert train.TrainConfig(model="mlp", move_at_floor=False).move_at_floor is False
    off = "lenet5" if not config.schedule("lenet5").move_at_floor else "dscnn"
    assert train.TrainConfig(model=off, admission="all_or_nothing").move_at_floor is False
    with pytest.raises(ValueError, match="--move_at_floor changes the all-or-nothing guard"):
        train.TrainConfig(model="mlp", admission="gain", move_at_floor=True).validate()
    cli = load_cli("mnist")
    assert cli.run_flags(cli.parse_args(["--model", "mlp"]))["move_at_floor"] is True
    assert cli.run_flags(cli.parse_args(["--model", "mlp", "--prune"]))["move_at_floor"] is None
    given = cli.run_flags(cli.parse_args(["--model", "mlp", "--no-move_at_floor"]))
    assert given["move_at_floor"] is None  # off: as a checkpoint written before the flag
    older = cli.run_flags(cli.parse_args(["--model", "mlp"]))
    del older["move_at_floor"]  # a checkpoint written before the flag
    assert rundir.changed_flags(older, given) == []
    assert rundir.changed_flags(older, cli.run_flags(cli.parse_args(["--model", "mlp"]))) == [
        "move_at_floor"
    ]


def test_microbatches_are_the_models_where_the_batch_splits_into_them():
    """``microbatches`` left out takes the model's schedule (8 for the DS-CNN, 1 for the
    others) where the batch splits into that many equal parts over the devices, else 1;
    given, a batch that does not split is refused by name. The CLI stores 1 as ``None`` (as
    checkpoints written before the flag): an older DS-CNN run is refused by name, and
    resumes with ``--microbatches 1``."""
    from cgmq_jax.runs import rundir

    assert train.TrainConfig(model="dscnn").microbatches == 8
    assert train.TrainConfig().microbatches == 1
    assert train.TrainConfig(model="lenet5_bb").microbatches == 1
    assert train.TrainConfig(model="dscnn", batch_size=100).microbatches == 1
    assert train.TrainConfig(model="dscnn", batch_size=64, devices=8).microbatches == 8
    assert train.TrainConfig(model="dscnn", batch_size=64, devices=16).microbatches == 1
    train.TrainConfig(model="dscnn", microbatches=4).validate()
    train.TrainConfig(model="dscnn", batch_size=100).validate()
    with pytest.raises(ValueError, match="--batch_size 100 does not split into --microbatches 8"):
        train.TrainConfig(model="dscnn", batch_size=100, microbatches=8).validate()
    with pytest.raises(ValueError, match="a multiple of 16"):
        train.TrainConfig(model="dscnn", batch_size=72, microbatches=8, devices=2).validate()
    with pytest.raises(ValueError, match=r"--microbatches must be an integer in \[1,"):
        train.TrainConfig(microbatches=0).validate()
    cli = load_cli("mnist")

    def flags(*argv):
        return cli.run_flags(cli.parse_args(list(argv)))

    assert flags("--model", "dscnn")["microbatches"] == 8
    assert flags("--model", "dscnn", "--microbatches", "4")["microbatches"] == 4
    assert flags("--model", "dscnn", "--batch_size", "100")["microbatches"] is None
    assert flags("--model", "dscnn", "--microbatches", "1")["microbatches"] is None
    assert flags()["microbatches"] is None
    older = flags("--model", "dscnn")
    del older["microbatches"]  # a DS-CNN checkpoint written before the flag
    assert rundir.changed_flags(older, flags("--model", "dscnn")) == ["microbatches"]
    assert rundir.changed_flags(older, flags("--model", "dscnn", "--microbatches", "1")) == []


def test_the_trainer_hands_microbatches_to_every_train_step(monkeypatch, tiny_mnist):
    """``TrainConfig.microbatches`` reaches the steps the trainer builds (the float
    phase's, QAT's and the fill's), and their loss and gradient are the whole batch's up to
    float rounding."""
    import chex
    import jax.numpy as jnp
    import optax

    from cgmq_jax.runs import steps

    seen, make_train_step = [], steps.make_train_step

    def recording(*args, **kwargs):
        seen.append(kwargs["microbatches"])
        return make_train_step(*args, **kwargs)

    monkeypatch.setattr(train, "make_train_step", recording)
    config = train.TrainConfig(
        budget_bops=2e6, pretrain_epochs=1, epochs=1, batch_size=32, microbatches=4,
        calibration_size=8,
    )  # fmt: skip
    result = train.fit(config, tiny_mnist, log=lambda _: None)
    assert seen == [4, 4, 4] and result.certificate["within_budget"]
    model = models.LeNet5(quantized=False)
    images, labels = (jnp.asarray(a[:32]) for a in tiny_mnist.train)
    params = model.init(jax.random.key(0), images)["params"]

    def loss(params, images, labels):
        logits = model.apply({"params": params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    whole = jax.value_and_grad(loss)(params, images, labels)
    parts = steps.microbatched(jax.value_and_grad(loss), 4)(params, images, labels)
    chex.assert_trees_all_close(whole, parts, rtol=1e-5, atol=1e-7)
    assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), whole, parts))
    one = jax.value_and_grad(loss)
    assert steps.microbatched(one, 1) is one  # the whole batch, the very same step
    with pytest.raises(ValueError, match="a batch of 32 does not split into 5 equal"):
        steps.microbatched(one, 5)(params, images, labels)
    with pytest.raises(ValueError, match="microbatches must be a positive integer, got 0"):
        steps.microbatched(one, 0)


@pytest.mark.parametrize("model", ["lenet5_bb", "lenet5"])
def test_the_trainer_hands_move_at_floor_to_the_constrained_update(monkeypatch, tiny_mnist, model):
    """``TrainConfig.move_at_floor`` (resolved: on for ``lenet5_bb``, off for LeNet-5)
    reaches the optimizer the trainer builds."""
    from cgmq_jax import optimizers

    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs["move_at_floor"])
        return optimizers.partitioned_adam(1e-3, 1e-2)  # a stand-in: nothing is trained here

    monkeypatch.setattr(optimizers, "cgmq_optimizer", recording)
    config = train.TrainConfig(model=model, budget_bops=4e7, calibration_size=8)
    train.initial_step(config, tiny_mnist)
    assert seen == [model == "lenet5_bb"]


def test_the_dscnn_lowers_a_tight_budget_over_two_qat_epochs_by_default():
    """The DS-CNN's schedule lowers a BOP budget below twice its minimum over its first 2
    QAT epochs (at most half of them; cgmq, --budget_bops alone, no --prune); larger
    budgets, other models, methods and limits keep the limit from the first step. The CLI
    stores what was resolved (an older DS-CNN checkpoint, None, is refused by name)."""
    from cgmq_jax.runs import rundir

    minimum = 2_403_456  # the DS-CNN's on 28 x 28 images
    tight = functools.partial(train.TrainConfig, model="dscnn", budget_bops=4e6)
    assert tight().budget_warmup(minimum) == 2
    assert tight(epochs=3).budget_warmup(minimum) == 1.5
    assert tight(budget_warmup_epochs=0).budget_warmup(minimum) == 0
    assert tight(budget_warmup_epochs=0.5).budget_warmup(minimum) == 0.5
    assert tight(budget_bops=8e6).budget_warmup(minimum) == 0  # 3.3x its minimum
    assert tight(budget_bops=8e6, budget_warmup_epochs=1).budget_warmup(minimum) == 1
    for off in (
        {"prune": True},
        {"budget_weight_kib": 8},
        {"method": "dq"},
        {"method": "float", "budget_bops": None},
        {"budget_bops": None, "budget_activation_kib": 4},
    ):
        assert tight(**off).budget_warmup(minimum) == 0, off
    for model in ("lenet5", "lenet5_bb", "mlp"):
        assert train.TrainConfig(model=model, budget_bops=4e6).budget_warmup(minimum) == 0
    cli = load_cli("mnist")
    tight_flags = ["--model", "dscnn", "--budget_bops", "4e6"]
    dscnn = cli.run_flags(cli.parse_args(tight_flags))
    assert dscnn["budget_warmup_epochs"] == 2
    for flags in ([], ["--model", "dscnn", "--budget_bops", "8e6"], ["--model", "dscnn"]):
        assert cli.run_flags(cli.parse_args(flags))["budget_warmup_epochs"] is None, flags
    short = ["--model", "dscnn", "--budget_bops", "4e6", "--epochs", "1"]
    assert cli.run_flags(cli.parse_args(short))["budget_warmup_epochs"] == 0.5
    older = {**dscnn, "budget_warmup_epochs": None}
    assert rundir.changed_flags(older, dscnn) == ["budget_warmup_epochs"]
    off = cli.parse_args([*tight_flags, "--budget_warmup_epochs", "0"])
    assert rundir.changed_flags(older, cli.run_flags(off)) == []  # resumes as it was trained
    assert off.budget_warmup_epochs == 0  # and the run's config keeps it off


@pytest.mark.parametrize("budget, said", [("4e6", True), ("8e6", False)])
def test_the_cli_says_when_the_models_warmup_lowers_the_budget(
    budget, said, tmp_path, monkeypatch, capsys
):
    cli = load_cli("mnist")
    monkeypatch.setattr(cli, "_train_and_publish", lambda args, *rest: 0)
    argv = ["--model", "dscnn", "--budget_bops", budget, "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert ("lowered" in out and "over the first 2 QAT epochs" in out) == said, out
    assert cli.main([*argv, "--budget_warmup_epochs", "1", "--overwrite"]) == 0
    assert "lowered" not in capsys.readouterr().out  # asked for: not news
