"""A small real model: a two-layer numpy network that classifies 4-feature iris-like measurements.

POST /infer with {"inputs": [[5.1, 3.5, 1.4, 0.2], ...]} answers
{"outputs": [{"label": "setosa", "probabilities": [...]}, ...]}. GET /health answers 200 once the
weights are loaded. Weights are fitted at start-up on a fixed synthetic data set (seeded), so the
model is deterministic and needs no download.
"""

import json
import os

import numpy as np
from aiohttp import web

LABELS = ["setosa", "versicolor", "virginica"]
CENTERS = np.array([[5.0, 3.4, 1.5, 0.25], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.5, 2.0]])


def train(seed: int = 7, steps: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + rng.normal(0, 0.3, size=(100, 4)) for c in CENTERS])
    y = np.repeat(np.arange(3), 100)
    mean, std = x.mean(0), x.std(0)
    x = (x - mean) / std
    w1, w2 = rng.normal(0, 0.5, (4, 16)), rng.normal(0, 0.5, (16, 3))
    onehot = np.eye(3)[y]
    for _ in range(steps):
        h = np.tanh(x @ w1)
        logits = h @ w2
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad_logits = (p - onehot) / len(x)
        grad_w2 = h.T @ grad_logits
        grad_w1 = x.T @ ((grad_logits @ w2.T) * (1 - h**2))
        w1 -= 0.5 * grad_w1
        w2 -= 0.5 * grad_w2
    return w1, w2, mean, std


W1, W2, MEAN, STD = train()


def predict(inputs: np.ndarray) -> list[dict[str, object]]:
    h = np.tanh(((inputs - MEAN) / STD) @ W1)
    logits = h @ W2
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return [
        {"label": LABELS[int(row.argmax())], "probabilities": [round(float(v), 4) for v in row]} for row in p
    ]


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def infer(request: web.Request) -> web.Response:
    try:
        body = await request.json()
        inputs = np.asarray(body["inputs"], dtype=float)
        if inputs.ndim != 2 or inputs.shape[1] != 4:
            raise ValueError("inputs must be a list of 4-number rows")
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
        return web.json_response({"error": f"bad input: {err}"}, status=400)
    return web.json_response({"outputs": predict(inputs)})


def main() -> None:
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/infer", infer)
    web.run_app(
        app, host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "8000")), print=None
    )


if __name__ == "__main__":
    main()
