"""Train a model built from the textbook's custom layers on scikit-learn's bundled 8x8 digits (no download),
save it, reload it on the numpy backend and predict there.

Run: python examples/train_digits.py [--backend torch|jax] [--epochs 30] [--out out]
Writes OUT/digits.safetensors and OUT/digits_loss.png.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from sklearn.datasets import load_digits

import lamina as lm


class CenteredLayer(lm.Module):  # the textbook's layer without parameters
    def forward(self, X):
        return X - X.mean()


class MyLinear(lm.Module):  # the textbook's layer with parameters
    def __init__(self, in_units, units):
        super().__init__()
        self.weight = lm.Parameter((in_units, units), init=lm.init.normal(0, in_units**-0.5))
        self.bias = lm.Parameter((units,), init=lm.init.zeros())

    def forward(self, X):
        return lm.ops.relu(X @ self.weight + self.bias)


class DigitNet(lm.Module):
    """Pixels and row spectra -> a hidden layer -> a linear head plus a quadratic (tensor-reduction) head."""

    def __init__(self):
        super().__init__()
        self.fourier = lm.LeadingFourier(split=True)  # exercise 2: the leading half of each row's DFT
        self.pixels = MyLinear(64, 128)
        self.spectral = lm.Linear(128)  # lazily sized from the spectra
        self.center = CenteredLayer()
        self.head = lm.Linear(10)
        self.squeeze = lm.Linear(16)
        self.quadratic = lm.TensorReduction(10)  # exercise 1: y_k = sum_ij W_ijk h_i h_j

    def forward(self, x):
        n = x.shape[0]
        spectrum = self.fourier(x.reshape(n, 8, 8)).reshape(n, 64)  # 8 rows x (4 real + 4 imaginary)
        h = self.center(self.pixels(x) + self.spectral(spectrum))
        return self.head(h) + self.quadratic(self.squeeze(h))


def data(seed: int = 0):
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(y))
    X, y = X[order], y[order]
    n_test = len(y) // 4
    return (X[n_test:], y[n_test:]), (X[:n_test], y[:n_test])


def main(backend: str, epochs: int, out: str, progress: bool | None) -> float:
    os.makedirs(out, exist_ok=True)
    (x_train, y_train), (x_test, y_test) = data()
    lm.set_backend(backend)
    lm.manual_seed(0)
    net = DigitNet()
    opt = lm.optim.Adam(net, lr=2e-3, schedule=lambda step: 2e-3 * 0.5 ** (step / 400))
    print(f"training DigitNet on {len(y_train)} digits with the {backend} backend")
    history = lm.fit(net, lm.losses.cross_entropy, opt, (x_train, y_train), epochs=epochs, batch_size=64,
                     validation_data=(x_test, y_test), metrics=[lm.losses.accuracy], progress=progress,
                     callbacks=[lm.EarlyStopping(monitor="val_loss", patience=5)])
    test = lm.evaluate(net, lm.losses.cross_entropy, (x_test, y_test), metrics=[lm.losses.accuracy])
    print(f"test accuracy on {backend}: {test['accuracy']:.4f} (loss {test['loss']:.4f}) after "
          f"{len(history['loss'])} epochs")
    net.summary((None, 64))
    path = os.path.join(out, "digits.safetensors")
    lm.save(net, path, optimizer=opt)
    history.plot(os.path.join(out, "digits_loss.png"), title=f"DigitNet on {backend}")
    print(f"saved {path} and {os.path.join(out, 'digits_loss.png')}")

    trained = lm.get_backend().to_numpy(lm.predict(net, x_test)).argmax(1)
    lm.set_backend("numpy")
    served = DigitNet()
    lm.load_into(served, path)  # a never-called model: the lazy layers take their shapes from the file
    logits = lm.predict(served, x_test)
    predicted = logits.argmax(1)
    accuracy = float((predicted == y_test).mean())
    print(f"reloaded on numpy: test accuracy {accuracy:.4f}; predictions identical to {backend}'s: "
          f"{bool((predicted == trained).all())}")
    print("first ten test digits:", y_test[:10].tolist(), "predicted:", predicted[:10].tolist())
    return accuracy


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    trainable = [b for b in lm.available_backends() if b != "numpy"]
    ap.add_argument("--backend", choices=trainable, default=trainable[0] if trainable else None)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", default="out")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="show the progress bar (default: only on a terminal)")
    args = ap.parse_args()
    if args.backend is None:
        ap.error("training needs torch or jax: pip install 'lamina[torch]' or 'lamina[jax]'")
    main(args.backend, args.epochs, args.out, args.progress)
