"""How good is a representation without a downstream task? Linear probes, k-NN and neighbours on frozen ``z``.

- :func:`linear_probe`: a logistic regression on standardised frozen features (the standard SSL protocol);
- :func:`knn_accuracy`: weighted k-NN on cosine similarity (Wu et al., CVPR 2018);
- :func:`nearest_neighbours`, :func:`neighbour_precision`: retrieval, precision@k;
- :func:`embed`, :func:`embed_resized`: representations of a data set, batch by batch, on the CPU;
- :func:`accuracy_se`: the binomial standard error of an accuracy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import normalize
from .encoders import Encoder
from .progress import tqdm


@torch.inference_mode()
def embed(encoder: Encoder, x: Tensor, batch_size: int = 256, progress: bool = False) -> Tensor:
    """Representations ``z (N, D)`` on the CPU of normalised images ``x (N, C, H, W)``, in eval mode."""
    was_training = encoder.training
    encoder.eval()
    dev = next(encoder.parameters()).device
    chunks = range(0, len(x), batch_size)
    z = torch.cat([encoder(x[i:i + batch_size].to(dev)).float().cpu()
                   for i in tqdm(chunks, desc="embed", disable=not progress)])
    encoder.train(was_training)
    return z


def linear_probe(z_train: Tensor, y_train: Tensor, z_test: Tensor, y_test: Tensor, seed: int = 0) -> float:
    """Accuracy of a logistic regression on standardised frozen features (scikit-learn, L-BFGS)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=seed))
    with threadpool_limits(1, user_api="blas"):  # BLAS threads fighting torch's made it 40x slower
        clf.fit(z_train.cpu().numpy(), y_train.cpu().numpy())  # scikit-learn fits on the CPU
        return float(clf.score(z_test.cpu().numpy(), y_test.cpu().numpy()))


def knn_accuracy(
    z_train: Tensor, y_train: Tensor, z_test: Tensor, y_test: Tensor, k: int = 20, temperature: float = 0.07
) -> float:
    """Weighted k-NN accuracy on cosine similarity (Wu et al., CVPR 2018): votes ``exp(sim / temperature)``."""
    sim = F.normalize(z_test, dim=1) @ F.normalize(z_train, dim=1).T  # (N_test, N_train)
    top, idx = sim.topk(min(k, len(z_train)), dim=1)
    votes = torch.zeros(len(z_test), int(y_train.max()) + 1, device=z_test.device, dtype=top.dtype)
    votes.scatter_add_(1, y_train[idx], (top / temperature).exp())  # (N_test, classes)
    return float((votes.argmax(1) == y_test).float().mean())


def accuracy_se(accuracy: float, n: int) -> float:
    """Standard error of an accuracy measured on ``n`` test samples: ``sqrt(a (1 - a) / n)`` (binomial).

    >>> accuracy_se(0.5, 100)
    0.05
    """
    if n < 1 or not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"need an accuracy in [0, 1] and n >= 1, got {accuracy} and {n}")
    return math.sqrt(accuracy * (1.0 - accuracy) / n)


def nearest_neighbours(z_query: Tensor, z_ref: Tensor, k: int = 5) -> tuple[Tensor, Tensor]:
    """The ``k`` reference vectors most cosine-similar to each query: ``(similarities, indices)``, each ``(Q, k)``.

    ``sim(a, b) = a.b / (|a||b|)``, sorted from the most similar. ``z_query (Q, D)``, ``z_ref (M, D)``, ``k <= M``.

    >>> sims, idx = nearest_neighbours(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0], [3.0, 0.0]]), k=1)
    >>> sims, idx
    (tensor([[1.]]), tensor([[1]]))
    """
    sim = F.normalize(z_query, dim=1) @ F.normalize(z_ref, dim=1).T  # (Q, M)
    return sim.topk(k, dim=1)


def neighbour_precision(idx: Tensor, y_ref: Tensor, y_query: Tensor) -> float:
    """Precision@k of neighbours: the share of the ``k`` neighbours ``idx (Q, k)`` whose label equals the query's.

    ``y_ref (M,)`` labels the reference set that ``idx`` indexes, ``y_query (Q,)`` the queries.

    >>> neighbour_precision(torch.tensor([[0, 1], [1, 2]]), torch.tensor([5, 6, 6]), torch.tensor([5, 6]))
    0.75
    """
    return float((y_ref[idx] == y_query[:, None]).float().mean())


def embed_resized(encoder: Encoder, images: Tensor, size: int = 224, batch_size: int = 256) -> Tensor:
    """Representations ``z (N, D)`` on the CPU of ``images (N, 3, h, w)`` in [0, 1], resized to ``size`` px.

    Each batch is resized (bilinear, antialiased) and normalised with the encoder's own ``mean`` and ``std``, as an
    ImageNet ResNet-50 wants its input, then embedded with :func:`embed`; only one batch is resized at a time.
    """
    zs = []
    for i in range(0, len(images), batch_size):
        x = F.interpolate(images[i:i + batch_size], size=(size, size), mode="bilinear", antialias=True)
        zs.append(embed(encoder, normalize(x, encoder.mean, encoder.std), batch_size=batch_size))
    return torch.cat(zs)  # (N, D)
