"""A small CNN (Conv2d, BatchNorm2d, pooling, Dropout) on scikit-learn's bundled 8x8 digits, with the
progress bar and the loss plot; then the trained model is served on the numpy backend.

Run: python examples/cnn_digits.py [--backend torch|jax] [--epochs 40] [--out out]
"""

from __future__ import annotations

import argparse
import os

from train_digits import data  # the same split as the other digits example

import lamina as lm


def cnn():
    return lm.Sequential(
        lm.Conv2d(16, 3, padding="same"), lm.BatchNorm2d(), lm.ReLU(), lm.MaxPool2d(2),  # (N, 16, 4, 4)
        lm.Conv2d(32, 3, padding="same"), lm.BatchNorm2d(), lm.ReLU(), lm.MaxPool2d(2),  # (N, 32, 2, 2)
        lm.Flatten(), lm.Dropout(0.3), lm.Linear(64), lm.ReLU(), lm.Dropout(0.3), lm.Linear(10),
    )


def main(backend: str, epochs: int, out: str, progress: bool | None) -> float:
    os.makedirs(out, exist_ok=True)
    (x_train, y_train), (x_test, y_test) = data()
    x_train, x_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)  # channels first
    lm.set_backend(backend)
    lm.manual_seed(0)
    net = cnn()
    opt = lm.optim.AdamW(net, lr=3e-3, weight_decay=1e-4, schedule=lambda step: 3e-3 * 0.5 ** (step / 300))
    print(f"training a CNN on {len(y_train)} digits with the {backend} backend")
    history = lm.fit(net, lm.losses.cross_entropy, opt, (x_train, y_train), epochs=epochs, batch_size=32,
                     validation_data=(x_test, y_test), metrics=[lm.losses.accuracy], progress=progress)
    test = lm.evaluate(net, lm.losses.cross_entropy, (x_test, y_test), metrics=[lm.losses.accuracy])
    print(f"test accuracy on {backend}: {test['accuracy']:.4f} (loss {test['loss']:.4f})")
    net.summary((None, 1, 8, 8))
    path = os.path.join(out, "cnn_digits.safetensors")
    lm.save(net, path)
    history.plot(os.path.join(out, "cnn_digits_loss.png"), title=f"CNN on {backend}")
    lm.set_backend("numpy")
    served = cnn()
    lm.load_into(served, path)  # weights, BatchNorm running statistics, all from the file
    accuracy = float((lm.predict(served, x_test).argmax(1) == y_test).mean())
    print(f"reloaded on numpy: test accuracy {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    trainable = [b for b in lm.available_backends() if b != "numpy"]
    ap.add_argument("--backend", choices=trainable, default=trainable[0] if trainable else None)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--out", default="out")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    args = ap.parse_args()
    if args.backend is None:
        ap.error("training needs torch or jax: pip install 'lamina[torch]' or 'lamina[jax]'")
    main(args.backend, args.epochs, args.out, args.progress)
