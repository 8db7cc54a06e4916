"""CUDA-graph training step: replays equal eager steps. Needs a CUDA device; skipped with the reason elsewhere."""

import pytest
import torch

from dsd2.config import ModelConfig, OptimConfig
from dsd2.data import DeviceDataset
from dsd2.data.batching import normalize
from dsd2.models import build_model
from dsd2.pruning import full_masks, global_prune, magnitude_scores, prunable_weights
from dsd2.training import build_optimizer, cross_entropy

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")]


def setup(model_name, optimizer):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    shape = (3, 32, 32) if model_name == "vgg" else (1, 8, 8)
    model = build_model(ModelConfig(name=model_name, depth=2, width=3), shape, 10).to(dev)
    masks = global_prune(magnitude_scores(model), full_masks(model), 0.5)
    with torch.no_grad():
        for k, w in prunable_weights(model).items():
            w.mul_(masks[k])
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (64 * 8 + 5, *shape), generator=g, dtype=torch.uint8).to(dev)
    labels = torch.randint(0, 10, (images.shape[0],), generator=g).to(dev)
    data = DeviceDataset(images, labels)
    mean, std = torch.full((shape[0],), 120.0, device=dev), torch.full((shape[0],), 70.0, device=dev)
    opt = build_optimizer(model, masks, OptimConfig(optimizer=optimizer, lr=0.01, batch_size=64))
    return model, opt, data, mean, std, masks


def eager_epoch(model, opt, data, mean, std, perm, batch=64):
    """The reference: plain eager steps over `perm`; returns the summed loss."""
    model.train()
    losses = torch.zeros((), device="cuda")
    for start in range(0, perm.numel(), batch):
        idx = perm[start:start + batch]
        loss = cross_entropy(model(normalize(data.images[idx], mean, std)), data.labels[idx], None, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses += loss.detach() * idx.numel()
    return losses


@pytest.mark.parametrize("model_name, optimizer", [("mlp", "sgd"), ("mlp", "adam"), ("vgg", "sgd")])
def test_graph_replays_equal_eager_steps(model_name, optimizer):
    from dsd2.training.graphs import GraphedTrainStep, graphed_epoch

    eager = setup(model_name, optimizer)
    graphed = setup(model_name, optimizer)
    perm = torch.randperm(eager[2].labels.numel(), generator=torch.Generator().manual_seed(2)).cuda()
    model, opt, data, mean, std, masks = eager
    losses = eager_epoch(model, opt, data, mean, std, perm)
    gmodel, gopt, gdata, gmean, gstd, gmasks = graphed

    def make(warm, lr):
        return GraphedTrainStep(gmodel, gopt, cross_entropy, gdata, 64, gmean, gstd, augment=False,
                                precision="fp32", channels_last=False, warmup_indices=warm, lr=lr)

    _, gloss, _ = graphed_epoch(None, make, perm, 64, 0.01)
    torch.testing.assert_close(gloss, losses, rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(prunable_weights(model).items(), prunable_weights(gmodel).values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert bool((b[~gmasks[name]] == 0).all())


def test_second_epoch_after_evaluation_reuses_the_graph_in_train_mode():
    """Evaluation between epochs leaves the model in eval mode; the graph must train in train mode (BatchNorm
    statistics updated) and take the new learning rate without recapture."""
    from dsd2.training import predict
    from dsd2.training.graphs import GraphedTrainStep, graphed_epoch

    eager, graphed = setup("vgg", "sgd"), setup("vgg", "sgd")
    perms = [torch.randperm(eager[2].labels.numel(), generator=torch.Generator().manual_seed(s)).cuda()
             for s in (3, 4)]
    model, opt, data, mean, std, _ = eager
    for perm, lr in zip(perms, (0.01, 0.002)):
        for group in opt.param_groups:
            group["lr"] = lr
        eager_epoch(model, opt, data, mean, std, perm)
        predict(model, data, batch_size=256, mean=mean, std=std)
    gmodel, gopt, gdata, gmean, gstd, _ = graphed

    def make(warm, lr):
        return GraphedTrainStep(gmodel, gopt, cross_entropy, gdata, 64, gmean, gstd, augment=False,
                                precision="fp32", channels_last=False, warmup_indices=warm, lr=lr)

    step = None
    for perm, lr in zip(perms, (0.01, 0.002)):
        step, _, _ = graphed_epoch(step, make, perm, 64, lr)
        predict(gmodel, gdata, batch_size=256, mean=gmean, std=gstd)
    for (name, a), b in zip(model.state_dict().items(), gmodel.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5, msg=name)
