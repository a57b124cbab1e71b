"""A model.py written the way the original product's Keras examples are (mnist): `swarmlearning.tf`,
camelCase arguments, (x_test, y_test) as adsValData, the callback given to model.fit. Keras 3 on
the torch backend here; tiny synthetic data made here.

Environment: NODE_ID, SWARM_SL_ADDR, OUT_DIR; optionally MIN_PEERS, SYNC_FREQUENCY, EPOCHS.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from swarmlearning.tf import SwarmCallback  # noqa: E402

node = os.environ["NODE_ID"]
out = os.path.join(os.environ["OUT_DIR"], node)
os.makedirs(out, exist_ok=True)
max_epochs = int(os.environ.get("EPOCHS", "2"))
keras.utils.set_random_seed(sum(map(ord, node)))


def make_data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype("float32")
    return x, ((x[:, 0] > 0).astype("int64") + (x[:, 1] > 0.5).astype("int64"))


x_train, y_train = make_data(96, sum(map(ord, node)))
x_test, y_test = make_data(40, 7)
model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dropout(0.1),
                          keras.layers.Dense(3, activation="softmax")])
model.compile(loss="sparse_categorical_crossentropy", optimizer=keras.optimizers.SGD(0.1), metrics=["accuracy"])

swarmCallback = SwarmCallback(syncFrequency=os.environ.get("SYNC_FREQUENCY", "4"),
                              minPeers=int(os.environ.get("MIN_PEERS", "2")), useAdaptiveSync=False,
                              adsValData=(x_test, y_test), adsValBatchSize=8, totalEpochs=max_epochs,
                              mergeMethod="coordMedian")
swarmCallback.logger.info("%s: starting", node)
model.fit(x_train, y_train, batch_size=8, epochs=max_epochs, verbose=0, shuffle=False, callbacks=[swarmCallback])
np.savez(os.path.join(out, "final.npz"), *model.get_weights())
print(f"{node}: done after {swarmCallback.core.rounds} syncs", flush=True)
