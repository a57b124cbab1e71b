############################################################################
# The mnist example's model.py in the original's shape (our own, smaller): Keras reads
# DATA_DIR/mnist.npz, the original's callback goes to model.fit with (x_test, y_test) as adsValData,
# and the model is saved under SCRATCH_DIR at the end. The one change from the original: `import keras`
# (Keras 3, here on the torch backend: KERAS_BACKEND=torch) where it imported tensorflow.
############################################################################

import logging
import os

import keras
import numpy as np
from swarmlearning.tf import SwarmCallback

batch_size = 8
num_classes = 10
default_max_epochs = 5
default_min_peers = 2

epochs = int(os.getenv('MAX_EPOCHS', str(default_max_epochs)))
min_peers = int(os.getenv('MIN_PEERS', str(default_min_peers)))
model_name = 'mnist_tf'
data_dir = os.getenv('DATA_DIR', '/platform/data')
save_dir = os.getenv('SCRATCH_DIR', '/platform/scratch')


def load_data(path):
    with np.load(path) as f:
        x_train, y_train = f['x_train'], f['y_train']
        x_test, y_test = f['x_test'], f['y_test']
        return (x_train, y_train), (x_test, y_test)


def main():
    keras.utils.set_random_seed(1)
    (x_train, y_train), (x_test, y_test) = load_data(os.path.join(data_dir, 'mnist.npz'))
    x_train, x_test = x_train / 255.0, x_test / 255.0

    model = keras.models.Sequential([
        keras.Input(shape=(28, 28)),
        keras.layers.Flatten(),
        keras.layers.Dense(16, activation='relu'),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(num_classes, activation='softmax')
    ])
    model.compile(optimizer='adam', loss='sparse_categorical_crossentropy', metrics=['accuracy'])

    # Create Swarm callback
    swarmCallback = SwarmCallback(syncFrequency=4,
                                  minPeers=min_peers,
                                  useAdaptiveSync=False,
                                  adsValData=(x_test, y_test),
                                  adsValBatchSize=batch_size,
                                  mergeMethod='coordmedian')
    swarmCallback.logger.setLevel(logging.DEBUG)

    model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, verbose=2, shuffle=False,
              callbacks=[swarmCallback])

    # Save model and weights
    swarmCallback.logger.info('Saving the final Swarm model ...')
    os.makedirs(save_dir, exist_ok=True)
    model_path = os.path.join(save_dir, model_name + '.keras')
    model.save(model_path)
    swarmCallback.logger.info(f'Saved the trained model - {model_path}')


if __name__ == '__main__':
    main()
