"""Independent float64 re-derivations of the math, written plainly, for the tests to compare against."""

import numpy as np

C = np.sqrt(2 / np.pi)
K = 0.044715


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


ACT = {
    "identity": lambda z: z,
    "relu": lambda z: np.maximum(z, 0),
    "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
    "sigmoid": sigmoid,
    "tanh": np.tanh,
    "gelu": lambda z: 0.5 * z * (1 + np.tanh(C * (z + K * z**3))),
    "silu": lambda z: z * sigmoid(z),
}

DACT = {
    "identity": lambda z: np.ones_like(z),
    "relu": lambda z: (z > 0).astype(float),
    "leaky_relu": lambda z: np.where(z > 0, 1.0, 0.01),
    "sigmoid": lambda z: sigmoid(z) * (1 - sigmoid(z)),
    "tanh": lambda z: 1 - np.tanh(z) ** 2,
    "gelu": lambda z: (0.5 * (1 + np.tanh(C * (z + K * z**3)))
                       + 0.5 * z * (1 - np.tanh(C * (z + K * z**3)) ** 2) * C * (1 + 3 * K * z**2)),
    "silu": lambda z: sigmoid(z) * (1 + z * (1 - sigmoid(z))),
}


def loss(z, y, name):
    """Mean loss; y: int labels for cross_entropy (or probability rows), targets otherwise."""
    z = np.asarray(z, dtype=np.float64)
    if name == "cross_entropy":
        lse = np.log(np.sum(np.exp(z - z.max(1, keepdims=True)), axis=1)) + z.max(1)
        if y.ndim == 1:
            return np.mean(lse - z[np.arange(len(y)), y])
        return np.mean(np.sum(y * (lse[:, None] - z), axis=1))
    if name == "binary_cross_entropy":
        return np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z))))
    if name == "mse":
        return np.mean((z - y) ** 2)
    raise ValueError(name)


def loss_grad(z, y, name):
    """dC/dz of the mean loss."""
    z = np.asarray(z, dtype=np.float64)
    B = z.shape[0]
    if name == "cross_entropy":
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        t = np.eye(z.shape[1])[y] if y.ndim == 1 else y
        return (p * t.sum(1, keepdims=True) - t) / B
    if name == "binary_cross_entropy":
        return (sigmoid(z) - y) / z.size
    if name == "mse":
        return 2 * (z - y) / z.size
    raise ValueError(name)


def mlp_loss_and_grads(weights, activations, X, y, loss_name):
    """Backprop for a list of (W, b), written as plainly as possible, in float64."""
    a = [np.asarray(X, dtype=np.float64)]
    zs = []
    for (W, b), act in zip(weights, activations):
        z = a[-1] @ W + b
        zs.append(z)
        a.append(ACT[act](z))
    value = loss(a[-1], y, loss_name)
    delta = loss_grad(a[-1], y, loss_name) * DACT[activations[-1]](zs[-1])
    grads = [None] * (2 * len(weights))
    for l in range(len(weights) - 1, -1, -1):
        grads[2 * l] = a[l].T @ delta
        grads[2 * l + 1] = delta.sum(0)
        if l > 0:
            delta = (delta @ weights[l][0].T) * DACT[activations[l - 1]](zs[l - 1])
    return value, grads


def mlp_forward(weights, activations, X):
    """The network's output for a list of (W, b), in float64."""
    a = np.asarray(X, dtype=np.float64)
    for (W, b), act in zip(weights, activations):
        a = ACT[act](a @ W + b)
    return a
