"""Captured training steps, evaluation and counting passes equal their eager versions.

Every test runs twice: with real CUDA graphs (marked `cuda`, skipped with the reason where no CUDA device is
present) and with the CPU graph emulator of `graph_emulator.py`, which replays only what a CUDA graph would
(recorded tensor operations on recorded memory; no Python, no rebound tensors, no host reads in capture).
"""

import pytest
import torch
from graph_emulator import EmulatedGraphs, HostSyncInCapture, MovedSinceCapture

from dsd2.config import ModelConfig, OptimConfig
from dsd2.data import DeviceDataset
from dsd2.data.batching import normalize
from dsd2.models import build_model
from dsd2.ops import swap_in_counting_relus
from dsd2.pruning import full_masks, global_prune, magnitude_scores, prunable_weights
from dsd2.training import DistillationObjective, InputFormat, TrainFeed, build_optimizer, cross_entropy, predict
from dsd2.training.graphs import CudaGraphs, GraphedPredictor, GraphedTrainStep, graphed_epoch

CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")])


@pytest.fixture
def reference_ops(monkeypatch):
    """The fused ops' plain-PyTorch paths: C++ (pybind) work bypasses the dispatcher the emulator records."""
    import importlib

    for name in ("kd_loss", "masked_sgd", "relu_count", "masked_linear", "masked_conv2d"):  # re-exported names
        monkeypatch.setattr(importlib.import_module(f"dsd2.ops.{name}"), "cpp_extension", lambda: None)


@pytest.fixture(params=[CUDA, "emulated"])
def env(request):
    """(device, graph maker)"""
    if request.param == "cuda":
        return torch.device("cuda"), CudaGraphs()
    request.getfixturevalue("reference_ops")
    return torch.device("cpu"), EmulatedGraphs()


# ---- the emulator itself: it must fail code that a CUDA graph would fail ---------------------------------------

def test_emulated_capture_computes_nothing_and_replays_tensor_work_only(reference_ops):
    graphs = EmulatedGraphs()
    total, x = torch.zeros(()), torch.ones(3)
    calls = []
    graph = graphs.graph()
    with graphs.capture(graph):
        calls.append(1)  # Python: runs at capture only
        total.add_((x * 2).sum())
    assert float(total) == 0.0 and calls == [1]
    x.fill_(5.0)  # inputs are read by address at every replay
    graph.replay()
    graph.replay()
    assert float(total) == 60.0 and calls == [1]


def test_emulated_capture_refuses_host_reads(reference_ops):
    graphs = EmulatedGraphs()
    with pytest.raises(HostSyncInCapture), graphs.capture(graphs.graph()):
        float(torch.ones(2).sum())


@pytest.mark.parametrize("read", [lambda t: t.sum().item(), lambda t: torch.equal(t, t), lambda t: t[t > 0],
                                  lambda t: t.nonzero(), lambda t: t.long().bincount()],
                         ids=["item", "equal", "bool-index", "nonzero", "bincount"])
def test_emulated_capture_refuses_other_host_reads(reference_ops, read):
    graphs = EmulatedGraphs()
    with pytest.raises(HostSyncInCapture), graphs.capture(graphs.graph()):
        read(torch.ones(4))


def test_emulated_replay_refuses_tensors_moved_since_capture(reference_ops):
    graphs = EmulatedGraphs()
    w, acc = torch.ones(3), torch.zeros(())
    graph = graphs.graph()
    with graphs.capture(graph):
        acc.add_(w.sum())
    w.data = torch.full((3,), 2.0)
    with pytest.raises(MovedSinceCapture):
        graph.replay()


def test_emulated_replay_does_not_see_rebound_tensors(reference_ops):
    graphs = EmulatedGraphs()
    box = {"acc": torch.zeros(())}
    graph = graphs.graph()
    with graphs.capture(graph):
        box["acc"].add_(1.0)
    old, box["acc"] = box["acc"], torch.zeros(())
    graph.replay()
    assert float(old) == 1.0 and float(box["acc"]) == 0.0


# ---- training step -------------------------------------------------------------------------------------------

def setup(model_name, optimizer, device):
    torch.manual_seed(0)
    shape = (3, 32, 32) if model_name == "vgg" else (1, 8, 8)
    model = build_model(ModelConfig(name=model_name, depth=2, width=3), shape, 10).to(device)
    masks = global_prune(magnitude_scores(model), full_masks(model), 0.5)
    with torch.no_grad():
        for k, w in prunable_weights(model).items():
            w.mul_(masks[k])
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (64 * 8 + 5, *shape), generator=g, dtype=torch.uint8).to(device)
    labels = torch.randint(0, 10, (images.shape[0],), generator=g).to(device)
    data = DeviceDataset(images, labels)
    mean = torch.full((shape[0],), 120.0, device=device)
    std = torch.full((shape[0],), 70.0, device=device)
    opt = build_optimizer(model, masks, OptimConfig(optimizer=optimizer, lr=0.01, batch_size=64))
    return model, opt, data, mean, std, masks


def eager_epoch(model, opt, data, mean, std, perm, objective=cross_entropy, batch=64):
    """The reference: plain eager steps over `perm`; returns the summed loss."""
    model.train()
    losses = torch.zeros((), device=data.images.device)
    for start in range(0, perm.numel(), batch):
        idx = perm[start:start + batch]
        x = normalize(data.images[idx], mean, std)
        loss = objective(model(x), data.labels[idx], x, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses += loss.detach() * idx.numel()
    return losses


def kd_teacher(device):
    torch.manual_seed(5)
    return build_model(ModelConfig(name="mlp", hidden=(32,)), (1, 8, 8), 10).to(device).eval()


@pytest.mark.parametrize("model_name, optimizer, objective", [
    ("mlp", "sgd", "ce"), ("mlp", "adam", "ce"), ("vgg", "sgd", "ce"), ("mlp", "sgd", "kd")])
def test_graph_replays_equal_eager_steps(env, model_name, optimizer, objective):
    device, graphs = env
    if optimizer == "adam" and device.type != "cuda":
        # Cannot be emulated: torch.optim.Adam(capturable=True), the engine's Adam on CUDA, refuses CPU tensors,
        # and CPU Adam reads its step counter with .item() inside every step, a host read that a capture (and
        # the emulator) refuses. The captured Adam path runs on a real GPU only.
        pytest.skip("capturable Adam needs a CUDA device; CPU Adam reads its step counter on the host")
    eager, graphed = setup(model_name, optimizer, device), setup(model_name, optimizer, device)
    perm = torch.randperm(eager[2].labels.numel(), generator=torch.Generator().manual_seed(2)).to(device)
    make_objective = (lambda: cross_entropy) if objective == "ce" else (
        lambda: DistillationObjective(kd_teacher(device), alpha=0.8, temperature=4.0))
    model, opt, data, mean, std, masks = eager
    losses = eager_epoch(model, opt, data, mean, std, perm, make_objective())
    gmodel, gopt, gdata, gmean, gstd, gmasks = graphed

    def make(warm, lr):
        return GraphedTrainStep(gmodel, gopt, make_objective(), TrainFeed(gdata, 64, InputFormat(gmean, gstd)),
                                warmup_indices=warm, lr=lr, graphs=graphs)

    step, gloss, _ = graphed_epoch(None, make, perm, 64, 0.01)
    if isinstance(graphs, EmulatedGraphs):
        assert graphs.captured[0].replays == 8 - 3  # 8 full batches, 3 of them warm-up steps; the tail eager
    torch.testing.assert_close(gloss, losses, rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(prunable_weights(model).items(), prunable_weights(gmodel).values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert bool((b[~gmasks[name]] == 0).all())


@pytest.mark.parametrize("augment", [True, False])
def test_captured_augmentation_draws_new_crops_and_flips_at_every_replay(env, augment):
    """Crop and flip run inside the captured step on the device's generator: two replays of the same batch at a
    learning rate of 0 (weights unchanged, BatchNorm on batch statistics) see different crops, so their losses
    differ; without augmentation they are equal, which shows the test sees nothing else."""
    device, graphs = env
    model, opt, data, mean, std, _ = setup("vgg", "sgd", device)
    idx = torch.arange(64, device=device)
    step = GraphedTrainStep(model, opt, cross_entropy, TrainFeed(data, 64, InputFormat(mean, std), augment),
                            warmup_indices=[idx] * 3, lr=0.0, graphs=graphs)
    losses = []
    for _ in range(3):
        step.loss_sum.zero_()
        step.replay(idx, 0.0)
        losses.append(float(step.loss_sum))
    if augment:
        assert len(set(losses)) == 3, losses
    else:
        assert len(set(losses)) == 1, losses


def test_second_epoch_after_evaluation_reuses_the_graph_in_train_mode(env):
    """Evaluation between epochs leaves the model in eval mode; the graph must train in train mode (BatchNorm
    statistics updated) and take the new learning rate without recapture."""
    device, graphs = env
    eager, graphed = setup("vgg", "sgd", device), setup("vgg", "sgd", device)
    perms = [torch.randperm(eager[2].labels.numel(), generator=torch.Generator().manual_seed(s)).to(device)
             for s in (3, 4)]
    model, opt, data, mean, std, _ = eager
    for perm, lr in zip(perms, (0.01, 0.002)):
        for group in opt.param_groups:
            group["lr"] = lr
        eager_epoch(model, opt, data, mean, std, perm)
        predict(model, data, 256, InputFormat(mean, std))
    gmodel, gopt, gdata, gmean, gstd, _ = graphed

    def make(warm, lr):
        return GraphedTrainStep(gmodel, gopt, cross_entropy, TrainFeed(gdata, 64, InputFormat(gmean, gstd)),
                                warmup_indices=warm, lr=lr, graphs=graphs)

    step = None
    for perm, lr in zip(perms, (0.01, 0.002)):
        step, _, _ = graphed_epoch(step, make, perm, 64, lr)
        predict(gmodel, gdata, 256, InputFormat(gmean, gstd))
    if isinstance(graphs, EmulatedGraphs):
        assert len(graphs.captured) == 1
        # the same ops on the same inputs, and one SGD formula for the float and the tensor learning rate
        for name, a in model.state_dict().items():
            assert torch.equal(a, gmodel.state_dict()[name]), name
    for (name, a), b in zip(model.state_dict().items(), gmodel.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5, msg=name)


def test_counting_train_step_counts_like_eager_steps(env):
    """The online-entropy epoch: ReLUs count inside the captured step; observations advance once per replay."""
    device, graphs = env
    eager, graphed = setup("vgg", "sgd", device), setup("vgg", "sgd", device)
    perm = torch.randperm(eager[2].labels.numel(), generator=torch.Generator().manual_seed(6)).to(device)
    relus, grelus = (swap_in_counting_relus(m[0], granularity="channel") for m in (eager, graphed))
    for r in [*relus.values(), *grelus.values()]:
        r.counting = True
    model, opt, data, mean, std, _ = eager
    eager_epoch(model, opt, data, mean, std, perm)
    gmodel, gopt, gdata, gmean, gstd, _ = graphed

    def make(warm, lr):
        return GraphedTrainStep(gmodel, gopt, cross_entropy, TrainFeed(gdata, 64, InputFormat(gmean, gstd)),
                                warmup_indices=warm, lr=lr, graphs=graphs,
                                relus=grelus)

    graphed_epoch(None, make, perm, 64, 0.01)
    for name, r in relus.items():
        assert grelus[name].observations == r.observations
        torch.testing.assert_close(grelus[name].counts, r.counts, rtol=0, atol=2)  # borderline float signs


# ---- evaluation and the counting pass -------------------------------------------------------------------------

def eval_setup(device, granularity="element"):
    model, _, data, mean, std, masks = setup("vgg", "sgd", device)
    relus = swap_in_counting_relus(model, granularity=granularity)
    return model, data, mean, std, masks, relus


def eager_counts(model, relus, data, mean, std, batch):
    for r in relus.values():
        r.reset_counts()
        r.counting = True
    logits = predict(model, data, batch, InputFormat(mean, std))
    out = {n: (r.counts.clone(), r.observations) for n, r in relus.items()}
    for r in relus.values():
        r.counting = False
        r.reset_counts()
    return logits, out


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_graphed_predict_and_counting_pass_equal_eager(env, granularity):
    device, graphs = env
    model, data, mean, std, masks, relus = eval_setup(device, granularity)
    batch = 100  # 517 samples: 5 replays and an eager tail of 17
    want = predict(model, data, batch, InputFormat(mean, std))
    want_logits, want_counts = eager_counts(model, relus, data, mean, std, batch)
    predictor = GraphedPredictor(model, batch, InputFormat(mean, std), relus=relus, graphs=graphs)
    for _ in range(2):  # the second pass replays the graphs captured by the first
        torch.testing.assert_close(predictor.predict(data), want, rtol=1e-5, atol=1e-5)
        for r in relus.values():
            r.reset_counts()  # the engine's reset rebinds the counter to None
            r.counting = True
        torch.testing.assert_close(predictor.predict(data), want_logits, rtol=1e-5, atol=1e-5)
        for name, (counts, observations) in want_counts.items():
            assert relus[name].observations == observations
            assert torch.equal(relus[name].counts, counts)
        for r in relus.values():
            r.counting = False
    assert predictor.replays == 4 * 5
    if isinstance(graphs, EmulatedGraphs):
        assert len(graphs.captured) == 2  # counting off, counting on


def test_counting_pass_adds_to_counts_already_held_and_to_restored_counters(env):
    device, graphs = env
    model, data, mean, std, masks, relus = eval_setup(device)
    part = DeviceDataset(data.images[:50], data.labels[:50])
    _, want_part = eager_counts(model, relus, part, mean, std, 64)
    _, want_all = eager_counts(model, relus, data, mean, std, 64)
    for r in relus.values():
        r.counting = True
    predict(model, part, 64, InputFormat(mean, std))  # eager counting first: the counters hold the part
    predictor = GraphedPredictor(model, 64, InputFormat(mean, std), relus=relus, graphs=graphs)
    predictor.predict(data)
    for name, r in relus.items():
        assert torch.equal(r.counts, want_part[name][0] + want_all[name][0])
        assert r.observations == want_part[name][1] + want_all[name][1]
        # a restored checkpoint: other counts, in a new tensor
        r.counts, r.observations = want_part[name][0].clone(), want_part[name][1]
    predictor.predict(data)
    predictor.predict(data)
    for name, r in relus.items():
        assert torch.equal(r.counts, want_part[name][0] + 2 * want_all[name][0])
        assert r.observations == want_part[name][1] + 2 * want_all[name][1]


def test_graphed_predict_follows_in_place_changes_and_recaptures_moved_weights(env):
    device, graphs = env
    model, data, mean, std, masks, relus = eval_setup(device)
    predictor = GraphedPredictor(model, 128, InputFormat(mean, std), relus=relus, graphs=graphs)
    predictor.predict(data)
    more = global_prune(magnitude_scores(model), masks, 0.5)
    with torch.no_grad():  # a prune, in place
        for k, w in prunable_weights(model).items():
            w.mul_(more[k])
    torch.testing.assert_close(predictor.predict(data), predict(model, data, 128, InputFormat(mean, std)))
    head = model.classifier if hasattr(model, "classifier") else list(model.modules())[-1]
    head.weight = torch.nn.Parameter(head.weight.detach() * 2)  # a new tensor, at a new address
    torch.testing.assert_close(predictor.predict(data), predict(model, data, 128, InputFormat(mean, std)))
    if isinstance(graphs, EmulatedGraphs):
        assert len(graphs.captured) == 2


# ---- the engine: a whole run with graphs equals the eager run --------------------------------------------------

# how a row was computed, not what: times, and the masked layers' paths (the fused CPU epoch against the graphed one)
VOLATILE = {"wall_time_s", "train_time_s", "images_per_s", "achieved_flop_per_s", "graph_capture_s", "kernels"}


def run_rows(path, cfg, graphs):
    from dsd2.run import LevelLoop
    from dsd2.runs import RunDir, read_jsonl

    engine = LevelLoop(cfg, RunDir(path), progress=False, log=lambda s: None, graphs=graphs)
    engine.run()
    drop = lambda rows: [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]  # noqa: E731
    return engine, drop(read_jsonl(path / "metrics.jsonl")), read_jsonl(path / "epochs.jsonl")


def assert_rows_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key, value in w.items():
            if isinstance(value, float):
                # the optimizer's learning-rate product rounds differently with a tensor lr (a few ulp)
                assert g[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (w["level"], key)
            else:
                assert g[key] == value, (w["level"], key)


@pytest.mark.slow
@pytest.mark.parametrize("entropy", ["pass", "online"])
def test_engine_run_with_graphs_equals_eager_run(tmp_path, tiny_config, reference_ops, entropy):
    cfg = tiny_config(analysis__entropy=entropy, optim__batch_size=64, optim__optimizer="sgd", optim__lr=0.05)
    _, eager, _ = run_rows(tmp_path / "eager", cfg, None)
    graphs = EmulatedGraphs()
    engine, graphed, epochs = run_rows(tmp_path / "graphs", cfg, graphs)
    assert engine.executor.mode == "graphed" and engine.executor.predictor.replays > 0
    # one train graph per level (a new optimizer) and one more for each online-counting epoch; evaluation
    # graphs (kept across levels): one, and one for the counting pass unless the states were counted online
    train_graphs, eval_graphs = (4, 2) if entropy == "pass" else (8, 1)
    assert len(graphs.captured) == train_graphs + eval_graphs
    assert all(g.replays > 0 for g in graphs.captured)
    assert sum("graph_capture_s" in r for r in epochs) == train_graphs
    assert_rows_close(graphed, eager)
    assert all("entropy_mean" in r for r in graphed)


@pytest.mark.slow
def test_distilled_run_with_graphs_equals_eager_run(tmp_path, tiny_config, reference_ops):
    from dsd2.run import student_config

    teacher = tmp_path / "teacher"
    run_rows(teacher, tiny_config(distill__students=()), None)
    student = tiny_config(optim__batch_size=64, optim__optimizer="sgd", optim__lr=0.05)
    cfg = student_config(student, "kd-sparse", teacher, "h", 2)
    _, eager, _ = run_rows(tmp_path / "eager", cfg, None)
    _, graphed, _ = run_rows(tmp_path / "graphs", cfg, EmulatedGraphs())
    assert_rows_close(graphed, eager)
    assert all("kd_kl" in r for r in graphed)


def load_bench_gpu(monkeypatch):
    import importlib.util
    from pathlib import Path

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))  # as when the script runs: its own folder on the path
    spec = importlib.util.spec_from_file_location("bench_gpu", benchmarks / "bench_gpu.py")
    bench_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gpu)
    return bench_gpu


@pytest.mark.slow
def test_gpu_benchmark_runs_every_variant_through_the_emulator(reference_ops, monkeypatch):
    """benchmarks/bench_gpu.py measures on a GPU only; its code paths are run here at toy size: the engine's
    eager epoch and its graph replays, augmentation included, and evaluation."""
    bench_gpu = load_bench_gpu(monkeypatch)
    g = torch.Generator().manual_seed(0)
    data = DeviceDataset(torch.randint(0, 256, (70, 3, 32, 32), generator=g, dtype=torch.uint8),
                         torch.randint(0, 10, (70,), generator=g))
    cfg = ModelConfig(name="vgg", depth=2, width=3)
    augmented = []
    real_crop_flip = __import__("dsd2.data.batching", fromlist=["crop_flip"]).crop_flip
    monkeypatch.setattr("dsd2.data.batching.crop_flip", lambda x, *a: augmented.append(x.shape[0]) or
                        real_crop_flip(x, *a))
    for graphs in (None, EmulatedGraphs()):
        for precision, channels_last in (("fp32", False), ("bf16", True)):
            step, capture = bench_gpu.bench(cfg, graphs, precision, channels_last, data, batch=16, epochs=1)
            assert step > 0 and (capture > 0) == (graphs is not None)
            assert bench_gpu.bench_eval(cfg, graphs, True, precision, channels_last, data, batch=16, passes=1) > 0
        if graphs is not None:
            assert graphs.captured and all(c.replays > 0 for c in graphs.captured)
    assert augmented  # the eager epochs drew crops and flips (a graph replays its captured draw)


def test_gpu_benchmark_op_cases_run_and_compute_what_the_eager_code_does(monkeypatch):
    """The op microbenchmarks at toy size on the CPU, Triton through its interpreter: every case runs, and the
    fused op and its eager counterpart compute the same thing (so the benchmark compares like with like)."""
    bench_gpu = load_bench_gpu(monkeypatch)
    cpu = torch.device("cpu")
    cases = [*bench_gpu.kd_cases(cpu, "triton", sizes=[(6, 10)]),
             *bench_gpu.counting_cases(cpu, "triton", shape=(4, 3, 5, 5)),
             *bench_gpu.sgd_cases(cpu, "triton", models={"mlp": ModelConfig(name="mlp", hidden=(8,))},
                                  shape=(1, 4, 4))]
    assert [c[0] for c in cases] == ["kd_loss forward+backward"] * 2 + ["relu_count", "count_positive_",
                                                                         "masked_sgd step"]
    rows = bench_gpu.bench_ops(cases, cpu, reps=1)
    assert all(ours > 0 and eager > 0 for _, _, ours, eager in rows)
    assert len(bench_gpu.op_table(rows)) == 2 + len(rows)
    # the counting cases' eager code counts what the op counts, in the same (logical) order for channels_last
    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    ours, eager = torch.zeros(48, dtype=torch.int64), torch.zeros(48, dtype=torch.int64)
    assert torch.equal(bench_gpu.relu_count(x, ours, backend="triton"), torch.relu(x))
    assert torch.equal(ours, eager.add_((x > 0).flatten(1).sum(0)))


def test_gpu_benchmark_refuses_without_cuda_in_one_sentence(monkeypatch, capsys):
    bench_gpu = load_bench_gpu(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        bench_gpu.main()
    assert exit_.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err
